//! A pseudo-terminal for `rune exec -it` into a process instance.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;

use tokio::sync::mpsc;

use super::{ExecInput, ExecOutput, RunError};

fn winsize(cols: u16, rows: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Starts `prog` on a new terminal; input and output travel over the returned channels.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    prog: &str,
    args: &[String],
    workdir: &Path,
    env: &BTreeMap<String, String>,
    uid: Option<u32>,
    gid: Option<u32>,
    cols: u16,
    rows: u16,
) -> Result<(mpsc::Sender<ExecInput>, mpsc::Receiver<ExecOutput>), RunError> {
    let (mut master, mut slave) = (0, 0);
    let ws = winsize(cols, rows);
    // SAFETY: openpty writes two descriptors into the integers passed; name and termios are null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(RunError::Runtime(format!(
            "cannot open a terminal: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: both descriptors were just returned by openpty and are owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // Processes forked meanwhile on other threads must not inherit the terminal, or its master
    // never sees the end of the session.
    for fd in [&master, &slave] {
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    let io = |fd: &OwnedFd| {
        fd.try_clone()
            .map(Stdio::from)
            .map_err(|e| RunError::Runtime(format!("cannot set up the terminal: {e}")))
    };
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args)
        .current_dir(workdir)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("TERM", "xterm-256color")
        .envs(env)
        .stdin(io(&slave)?)
        .stdout(io(&slave)?)
        .stderr(io(&slave)?);
    if let Some(g) = gid {
        cmd.gid(g);
    }
    if let Some(u) = uid {
        cmd.uid(u);
    }
    // SAFETY: only async-signal-safe calls between fork and exec: a new session, whose
    // controlling terminal becomes stdin (the terminal's other end).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| RunError::Launch(format!("{prog}: {e}")))?;
    drop(slave);
    let mut reader = std::fs::File::from(
        master
            .try_clone()
            .map_err(|e| RunError::Runtime(format!("cannot set up the terminal: {e}")))?,
    );
    let mut writer = std::fs::File::from(master);
    let (in_tx, mut in_rx) = mpsc::channel::<ExecInput>(16);
    let (out_tx, out_rx) = mpsc::channel::<ExecOutput>(16);
    // A thread the system refuses (tasks limit) fails this exec, not the task serving it; the
    // child, killed on drop, goes with it.
    let thread_error =
        |e: std::io::Error| RunError::Runtime(format!("cannot start the terminal's thread: {e}"));
    std::thread::Builder::new()
        .name("exec-pty-in".into())
        .spawn(move || {
            while let Some(i) = in_rx.blocking_recv() {
                match i {
                    ExecInput::Stdin(b) => {
                        if writer.write_all(&b).is_err() {
                            break;
                        }
                    }
                    ExecInput::Resize { cols, rows } => {
                        let ws = winsize(cols, rows);
                        // SAFETY: TIOCSWINSZ reads one winsize from the pointer passed.
                        unsafe {
                            libc::ioctl(writer.as_raw_fd(), libc::TIOCSWINSZ, &ws);
                        }
                    }
                    // A terminal has no end of input of its own; ^D is a byte the client sends.
                    ExecInput::Eof => {}
                }
            }
        })
        .map_err(thread_error)?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let tx = out_tx.clone();
    std::thread::Builder::new()
        .name("exec-pty-out".into())
        .spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            // EIO once the last process holding the terminal is gone.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0
                    || tx
                        .blocking_send(ExecOutput::Stdout(bytes::Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                {
                    break;
                }
            }
            let _ = done_tx.send(());
        })
        .map_err(thread_error)?;
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    tokio::spawn(async move {
        let waited = tokio::select! {
            w = child.wait() => w,
            // The client went away: hang up the terminal's session as a closed terminal would,
            // and kill what ignores that.
            _ = out_tx.closed() => {
                if let Some(pid) = pid {
                    super::signal_group(pid, libc::SIGHUP);
                }
                match tokio::time::timeout(std::time::Duration::from_secs(2), child.wait()).await {
                    Ok(w) => w,
                    Err(_) => {
                        if let Some(pid) = pid {
                            super::signal_group(pid, libc::SIGKILL);
                        }
                        child.wait().await
                    }
                }
            }
        };
        let code = match waited {
            Ok(st) => {
                use std::os::unix::process::ExitStatusExt;
                st.code()
                    .map(i64::from)
                    .or(st.signal().map(|s| 128 + i64::from(s)))
                    .unwrap_or(-1)
            }
            Err(_) => -1,
        };
        let _ = done_rx.await;
        let _ = out_tx.send(ExecOutput::Exit(code)).await;
    });
    Ok((in_tx, out_rx))
}
