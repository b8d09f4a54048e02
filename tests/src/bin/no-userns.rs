//! no-userns: runs a command as user 65534 where the kernel refuses it a
//! user namespace, as on a system that refuses them to unprivileged users
//! (Ubuntu's AppArmor policy, `user.max_user_namespaces = 0`), without
//! changing the machine's own settings: the command runs in a user
//! namespace of this helper's (ids 0..65536 mapped to themselves) whose
//! `user.max_user_namespaces` is 0, which binds every namespace below it.
//!
//! ```text
//! no-userns PROGRAM ARGS...    # as root
//! ```
//!
//! Its exit status is the command's. One process forks: the child unshares
//! its user namespace and waits; the parent, root outside, writes the
//! child's id maps (a process cannot map more than itself from inside);
//! the child then sets the limit, becomes 65534 and execs.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;

const NOBODY: u32 = 65534;

fn main() {
    let args: Vec<CString> = std::env::args_os()
        .skip(1)
        .map(|a| CString::new(a.as_bytes()).expect("an argument with a NUL byte"))
        .collect();
    if args.is_empty() {
        eprintln!("usage: no-userns PROGRAM ARGS...");
        std::process::exit(2);
    }
    let (mut ready_r, mut ready_w) = std::io::pipe().unwrap();
    let (mut go_r, mut go_w) = std::io::pipe().unwrap();
    // SAFETY: this process has one thread; the child only makes syscalls
    // and execs or exits.
    match unsafe { libc::fork() } {
        -1 => fail("fork"),
        0 => {
            drop((ready_r, go_w));
            // SAFETY: flags only.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
                fail("unshare(CLONE_NEWUSER)");
            }
            ready_w.write_all(b"u").unwrap();
            let mut b = [0u8];
            go_r.read_exact(&mut b).unwrap();
            std::fs::write("/proc/sys/user/max_user_namespaces", "0")
                .unwrap_or_else(|e| panic!("user.max_user_namespaces: {e}"));
            // SAFETY: plain id-setting syscalls; the argv pointers outlive execvp.
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(NOBODY, NOBODY, NOBODY) != 0
                    || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0
                {
                    fail("becoming user 65534");
                }
                let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
                argv.push(std::ptr::null());
                libc::execvp(argv[0], argv.as_ptr());
            }
            fail("exec")
        }
        child => {
            drop((ready_w, go_r));
            let mut b = [0u8];
            ready_r.read_exact(&mut b).expect("the child ended before unsharing");
            for map in ["uid_map", "gid_map"] {
                std::fs::write(format!("/proc/{child}/{map}"), format!("0 0 {}\n", NOBODY + 2))
                    .unwrap_or_else(|e| panic!("{map}: {e}"));
            }
            go_w.write_all(b"g").unwrap();
            let mut status = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            std::process::exit(code);
        }
    }
}

fn fail(what: &str) -> ! {
    eprintln!("no-userns: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(127);
}
