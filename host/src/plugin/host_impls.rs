//! The host side of the WIT imports: the `byte-stream` resource, filtered
//! `http`, and the confined `fs` capability.

use super::bindings::driver::gantry::plugin::fs;
use super::bindings::transport::gantry::plugin::{http, types};
use super::bindings::WitError;
use super::{ByteStream, Sandbox};
use crate::confined::{self, Whiteouts};
use std::io;
use wasmtime::component::Resource;

/// An I/O error as the guest sees it.
pub(super) fn io_error(e: io::Error) -> WitError {
    match e.kind() {
        io::ErrorKind::NotFound => WitError::NotFound(e.to_string()),
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => WitError::Invalid(e.to_string()),
        io::ErrorKind::PermissionDenied => WitError::Denied(e.to_string()),
        io::ErrorKind::UnexpectedEof => WitError::Invalid(format!("truncated input: {e}")),
        io::ErrorKind::TimedOut => WitError::Internal(e.to_string()),
        _ => WitError::Internal(e.to_string()),
    }
}

impl types::Host for Sandbox {}

impl types::HostByteStream for Sandbox {
    fn read(&mut self, s: Resource<ByteStream>, len: u32) -> Result<Vec<u8>, WitError> {
        self.host(|me| {
            let stream = me.table.get_mut(&s).map_err(|e| WitError::Internal(e.to_string()))?;
            confined::read_chunk(&mut stream.0, len).map_err(|e| WitError::Transient(e.to_string()))
        })
    }

    fn drop(&mut self, s: Resource<ByteStream>) -> wasmtime::Result<()> {
        self.take_stream(s)?;
        Ok(())
    }
}

/// The body of a request a guest sends.
enum RequestBody {
    None,
    /// Small bytes the guest made (a manifest).
    Bytes(Vec<u8>),
    /// A host-owned stream the guest only names (a blob being pushed).
    Stream(Resource<ByteStream>, Option<u64>),
}

impl http::Host for Sandbox {
    fn send(&mut self, req: http::Request) -> Result<http::Response, WitError> {
        self.http_send(req, RequestBody::None)
    }

    fn send_bytes(&mut self, req: http::Request, body: Vec<u8>) -> Result<http::Response, WitError> {
        self.http_send(req, RequestBody::Bytes(body))
    }

    fn send_body(
        &mut self,
        req: http::Request,
        body: Resource<ByteStream>,
        length: Option<u64>,
    ) -> Result<http::Response, WitError> {
        self.http_send(req, RequestBody::Stream(body, length))
    }
}

impl Sandbox {
    /// Sends one request of the guest's within the call's scope; the
    /// response body becomes a host-owned stream the guest may read.
    fn http_send(&mut self, req: http::Request, body: RequestBody) -> Result<http::Response, WitError> {
        self.host(|me| {
            let policy = me
                .http
                .clone()
                .ok_or_else(|| WitError::Denied("this plugin has no network access".into()))?;
            let scope = me
                .http_scope
                .as_mut()
                .ok_or_else(|| WitError::Denied("no endpoint is open for this call".into()))?;
            let resp = match body {
                RequestBody::None => policy.send(scope, &req.method, &req.url, req.headers)?,
                RequestBody::Bytes(b) => {
                    let len = b.len() as u64;
                    let mut reader = std::io::Cursor::new(b);
                    policy.send_body(scope, &req.method, &req.url, req.headers, &mut reader, Some(len))?
                }
                RequestBody::Stream(r, length) => {
                    let stream = me.table.get_mut(&r).map_err(|e| WitError::Internal(e.to_string()))?;
                    policy.send_body(scope, &req.method, &req.url, req.headers, &mut *stream.0, length)?
                }
            };
            let body = me.push_stream(ByteStream(resp.body))?;
            Ok(http::Response {
                status: resp.status,
                headers: resp.headers,
                body,
            })
        })
    }
}

impl Sandbox {
    fn home(&self) -> Result<std::sync::Arc<confined::Home>, WitError> {
        self.home
            .clone()
            .ok_or_else(|| WitError::Denied("this plugin has no file system".into()))
    }

    fn fs<R>(&mut self, f: impl FnOnce(&confined::Home) -> io::Result<R>) -> Result<R, WitError> {
        let home = self.home()?;
        self.host(|_| f(&home).map_err(io_error))
    }
}

fn change_kind(k: confined::ChangeKind) -> fs::ChangeKind {
    match k {
        confined::ChangeKind::Add => fs::ChangeKind::Add,
        confined::ChangeKind::Modify => fs::ChangeKind::Modify,
        confined::ChangeKind::Delete => fs::ChangeKind::Delete,
    }
}

impl Sandbox {
    /// A tar stream the host made, handed to the guest as a handle.
    fn packed(
        &mut self,
        make: impl FnOnce(&confined::Home) -> io::Result<confined::PackReader>,
    ) -> Result<Resource<ByteStream>, WitError> {
        let home = self.home()?;
        self.host(|me| {
            let r = make(&home).map_err(io_error)?;
            me.push_stream(ByteStream(Box::new(r)))
        })
    }
}

impl fs::Host for Sandbox {
    fn mkdir_all(&mut self, path: String, mode: u32) -> Result<(), WitError> {
        self.fs(|h| h.mkdir_all(&path, mode & 0o7777))
    }

    fn remove_all(&mut self, path: String) -> Result<(), WitError> {
        self.fs(|h| h.remove_all(&path))
    }

    fn exists(&mut self, path: String) -> Result<bool, WitError> {
        self.fs(|h| h.exists(&path))
    }

    fn rename(&mut self, src: String, dst: String) -> Result<(), WitError> {
        self.fs(|h| h.rename(&src, &dst))
    }

    fn read_file(&mut self, path: String) -> Result<Vec<u8>, WitError> {
        self.fs(|h| h.read_file(&path, 1 << 20))
    }

    fn write_file(&mut self, path: String, data: Vec<u8>, mode: u32) -> Result<(), WitError> {
        self.fs(|h| h.write_file(&path, &data, mode & 0o777))
    }

    fn list_dir(&mut self, path: String) -> Result<Vec<String>, WitError> {
        self.fs(|h| h.list_dir(&path))
    }

    fn symlink(&mut self, target: String, path: String) -> Result<(), WitError> {
        self.fs(|h| h.symlink(&target, &path))
    }

    fn unpack(&mut self, dir: String, diff: Resource<ByteStream>, mode: fs::WhiteoutMode) -> Result<u64, WitError> {
        let home = self.home()?;
        let mode = match mode {
            fs::WhiteoutMode::Delete => Whiteouts::Delete,
            fs::WhiteoutMode::Overlay => Whiteouts::Overlay,
        };
        self.host(|me| {
            let stream = me.table.get_mut(&diff).map_err(|e| WitError::Internal(e.to_string()))?;
            home.unpack(&dir, &mut stream.0, mode).map_err(io_error)
        })
    }

    fn pack(&mut self, dir: String) -> Result<Resource<ByteStream>, WitError> {
        self.packed(|h| h.pack(&dir))
    }

    fn pack_changes(&mut self, lower: String, upper: String) -> Result<Resource<ByteStream>, WitError> {
        self.packed(|h| h.pack_changes(&lower, &upper))
    }

    fn copy_tree(&mut self, src: String, dst: String) -> Result<(), WitError> {
        self.fs(|h| h.copy_tree(&src, &dst, confined::CopyMode::Copy))
    }

    fn share_tree(&mut self, src: String, dst: String) -> Result<(), WitError> {
        self.fs(|h| h.copy_tree(&src, &dst, confined::CopyMode::Share))
    }

    fn changes(&mut self, lower: String, upper: String) -> Result<Vec<fs::Change>, WitError> {
        self.fs(|h| {
            Ok(h.changes(&lower, &upper)?
                .into_iter()
                .map(|(path, kind)| fs::Change {
                    path,
                    kind: change_kind(kind),
                })
                .collect())
        })
    }

    fn disk_usage(&mut self, dir: String) -> Result<u64, WitError> {
        self.fs(|h| h.disk_usage(&dir))
    }

    fn mount_overlay(&mut self, m: fs::OverlayMount) -> Result<(), WitError> {
        let spec = confined::OverlaySpec {
            target: m.target,
            lowers: m.lowers,
            upper: m.upper,
            work: m.work,
        };
        self.fs(|h| h.mount_overlay(&spec))
    }

    fn unmount(&mut self, target: String) -> Result<(), WitError> {
        self.fs(|h| h.unmount(&target))
    }

    fn pack_upper(&mut self, dir: String) -> Result<Resource<ByteStream>, WitError> {
        self.packed(|h| h.pack_upper(&dir))
    }
}
