//! Kernel side of tracer: TCP lifecycle and the first bytes of every socket read/write.
//!
//! The data path needs no kprobes: `sock:sock_{send,recv}_length` (which fire only for sockets)
//! filter TCP and, from the syscall's own registers, find the user buffer and emit one event
//! (`probes/sock_data.rs`). Where that cannot load, `sys_enter` stores each read/write-family
//! call's buffer, `sock_*_length` names the socket, and `sys_exit` copies the bytes
//! (`probes/syscalls.rs`). TLS plaintext comes from uprobes on OpenSSL's read and write calls,
//! as events of the socket the library used inside them (`probes/tls.rs`).
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod maps;
mod probes;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: never reached; the verifier rejects programs whose panics are reachable.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
