//! libnftables, the library the `nft` program is a thin front of, kept open on a thread of its
//! own. Spawning `nft` for every change cost ~15 ms even for one element: a process start, and
//! at its exit the close of its netlink socket waits out an RCU grace period. A context kept
//! open pays neither, and its socket stays in the network namespace of the thread that opened
//! it. The library is loaded at run time, so a host without nftables still runs runed (policy
//! then stays in the proxy), as a missing `nft` did.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};

use tokio::sync::{mpsc, oneshot};

use crate::nft::NftError;

/// The library's file, unless `RUNE_LIBNFTABLES` names another (a build of its own, or, in
/// tests, one that does not exist).
const LIBRARY: &str = "libnftables.so.1";

/// `NFT_CTX_OUTPUT_JSON`: listings come back as JSON, and a JSON buffer is parsed as JSON
/// (libnftables 1.0.6 tries JSON input first when JSON output is on).
const OUTPUT_JSON: c_uint = 1 << 4;

/// Requests in flight to the context's thread; callers are few (the data plane's loop and a
/// scrape) and each waits for its answer.
const QUEUE: usize = 16;

type Job = (String, oneshot::Sender<Result<String, NftError>>);

/// An open libnftables context. Cloning shares it; commands run one at a time, in order.
#[derive(Clone)]
pub struct Nft {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Nft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nft")
    }
}

impl Nft {
    /// Loads the library and opens a context on a new thread, which inherits the calling
    /// thread's network namespace: open it where the table should live.
    pub fn open() -> Result<Nft, NftError> {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("rune-nft".into())
            .spawn(move || {
                let ctx = match Context::new() {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // Ends when every handle is dropped.
                while let Some((cmd, reply)) = rx.blocking_recv() {
                    let _ = reply.send(ctx.run(&cmd));
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| NftError::Io(std::io::Error::other("the nftables thread ended at start")))??;
        Ok(Nft { tx })
    }

    /// Runs a buffer of commands (nft's text or its JSON) as one transaction; returns what
    /// it printed (JSON).
    pub async fn run(&self, cmd: String) -> Result<String, NftError> {
        let (reply, answer) = oneshot::channel();
        let gone = || NftError::Io(std::io::Error::other("the nftables thread is gone"));
        self.tx.send((cmd, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxSetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// A context and the functions it is used with; lives and dies on the context's thread.
struct Context {
    ctx: *mut c_void,
    free: CtxFree,
    run: RunCmd,
    output: CtxBuffer,
    error: CtxBuffer,
    // Last: the functions above point into it.
    _lib: libloading::Library,
}

impl Context {
    fn new() -> Result<Context, NftError> {
        let name = std::env::var_os("RUNE_LIBNFTABLES").unwrap_or_else(|| LIBRARY.into());
        // SAFETY: loading libnftables runs its initialisers, which only set up its own state.
        let lib = unsafe { libloading::Library::new(&name) }.map_err(|_| NftError::Missing)?;
        // SAFETY: the symbols are libnftables' public API (nftables/libnftables.h, stable
        // since 0.9), declared with the C signatures above.
        unsafe {
            let ctx_new: CtxNew = sym(&lib, b"nft_ctx_new\0")?;
            let free: CtxFree = sym(&lib, b"nft_ctx_free\0")?;
            let buffer_output: CtxInt = sym(&lib, b"nft_ctx_buffer_output\0")?;
            let buffer_error: CtxInt = sym(&lib, b"nft_ctx_buffer_error\0")?;
            let set_flags: CtxSetFlags = sym(&lib, b"nft_ctx_output_set_flags\0")?;
            let output: CtxBuffer = sym(&lib, b"nft_ctx_get_output_buffer\0")?;
            let error: CtxBuffer = sym(&lib, b"nft_ctx_get_error_buffer\0")?;
            let run: RunCmd = sym(&lib, b"nft_run_cmd_from_buffer\0")?;
            let ctx = ctx_new(0);
            if ctx.is_null() {
                return Err(NftError::Io(std::io::Error::other("nft_ctx_new failed")));
            }
            let me = Context {
                ctx,
                free,
                run,
                output,
                error,
                _lib: lib,
            };
            if buffer_output(ctx) != 0 || buffer_error(ctx) != 0 {
                return Err(NftError::Io(std::io::Error::other(
                    "libnftables cannot buffer its output",
                )));
            }
            set_flags(ctx, OUTPUT_JSON);
            Ok(me)
        }
    }

    fn run(&self, cmd: &str) -> Result<String, NftError> {
        let text = CString::new(cmd).map_err(|_| NftError::Refused("a command holds a NUL byte".into()))?;
        // SAFETY: `ctx` is live for `self`'s life and used from this thread only; the buffers
        // it returns are valid until the next call on it, and are copied out before that.
        let (rc, out, err) = unsafe {
            let rc = (self.run)(self.ctx, text.as_ptr());
            (rc, copy(self.output, self.ctx), copy(self.error, self.ctx))
        };
        if rc == 0 {
            return Ok(out);
        }
        if err.contains("Operation not permitted") || err.contains("Permission denied") {
            return Err(NftError::Privilege);
        }
        let err: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).take(6).collect();
        Err(NftError::Refused(err.join(" | ")))
    }
}

/// A function of the library, copied out of it.
///
/// # Safety
/// `T` must be the function's true type; the copy must not outlive `lib`.
unsafe fn sym<T: Copy>(lib: &libloading::Library, name: &[u8]) -> Result<T, NftError> {
    lib.get::<T>(name)
        .map(|s| *s)
        .map_err(|e| NftError::Io(std::io::Error::other(format!("libnftables: {e}"))))
}

/// Copies one of the context's buffers (which a get also resets).
///
/// # Safety
/// `f` must be one of the buffer getters and `ctx` a live context.
unsafe fn copy(f: CtxBuffer, ctx: *mut c_void) -> String {
    let p = f(ctx);
    if p.is_null() {
        return String::new();
    }
    CStr::from_ptr(p).to_string_lossy().into_owned()
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the context was made by nft_ctx_new and is freed once, before the library.
        unsafe { (self.free)(self.ctx) }
    }
}
