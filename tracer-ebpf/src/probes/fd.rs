//! A syscall's socket found from its file descriptor, for the syscall data paths on kernels
//! without `sock:sock_{send,recv}_length` (before 6.3) and without the fentry path's helpers
//! (before 5.15: Debian 11's and Amazon Linux 2's 5.10): `current->files->fdt->fd[fd]`, whose
//! `private_data` is a `struct socket` when it points back at the file. Offsets from the
//! kernel's BTF, set by the loader; off (FD_WALK 0) wherever `sock_*_length` names the socket.
use core::ptr::read_volatile;

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_get_current_task};

/// 1: name sockets by their descriptor (set by the loader, frozen: the verifier drops the
/// walk where it is 0).
#[unsafe(no_mangle)]
static FD_WALK: u32 = 0;
/// `task_struct.files`, `files_struct.fdt`, `fdtable.max_fds` and `fdtable.fd`,
/// `file.private_data`, `socket.file` and `socket.sk`.
#[unsafe(no_mangle)]
static TASK_FILES_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FILES_FDT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FDT_MAX_FDS_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FDT_FD_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FILE_PRIVATE_DATA_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SOCKET_FILE_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SOCKET_SK_OFFSET: u32 = 0;

/// Whether the syscall paths name sockets by descriptor here.
#[inline(always)]
pub fn enabled() -> bool {
    // SAFETY: a read-only global patched by the loader; volatile so LLVM does not fold the 0.
    unsafe { read_volatile(&FD_WALK) != 0 }
}

#[inline(always)]
fn offset(global: &u32) -> u64 {
    // SAFETY: as above.
    u64::from(unsafe { read_volatile(global) })
}

#[inline(always)]
fn read(addr: u64) -> Option<u64> {
    // SAFETY: kernel memory read through the checked helper.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.ok()
}

/// The `struct sock` behind the current task's descriptor `fd`, if it is a socket.
#[inline(always)]
pub fn socket_of(fd: u64) -> Option<u64> {
    // SAFETY: helper without preconditions.
    let task = unsafe { bpf_get_current_task() };
    let files = read(task + offset(&TASK_FILES_OFFSET)).filter(|&p| p != 0)?;
    let fdt = read(files + offset(&FILES_FDT_OFFSET)).filter(|&p| p != 0)?;
    // SAFETY: as in `read`.
    let max =
        unsafe { bpf_probe_read_kernel((fdt + offset(&FDT_MAX_FDS_OFFSET)) as *const u32) }.ok()?;
    if fd >= u64::from(max) {
        return None;
    }
    let fds = read(fdt + offset(&FDT_FD_OFFSET)).filter(|&p| p != 0)?;
    let file = read(fds + fd * 8).filter(|&p| p != 0)?;
    let socket = read(file + offset(&FILE_PRIVATE_DATA_OFFSET)).filter(|&p| p != 0)?;
    // Any other file's private data (a pipe's, an eventfd's) does not point back at it.
    if read(socket + offset(&SOCKET_FILE_OFFSET))? != file {
        return None;
    }
    read(socket + offset(&SOCKET_SK_OFFSET)).filter(|&p| p != 0)
}
