pub mod data;
pub mod fd;
pub mod sock;
pub mod sock_data;
pub mod syscalls;
pub mod tls;
