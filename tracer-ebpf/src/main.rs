//! Kernel side of tracer: TCP lifecycle and the first bytes of every socket read/write.
//!
//! The data path needs no kprobes: `syscalls:sys_enter_*` stores the user buffer of each
//! read/write-family call, `sock:sock_{send,recv}_length` (which fire only for sockets) names the
//! socket and filters TCP, and `syscalls:sys_exit_*` copies the bytes and emits one event.
#![no_std]
#![no_main]

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
