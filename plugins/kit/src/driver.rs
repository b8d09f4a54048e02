//! Writing a graph driver: implement [`Driver`] (every method has a
//! default, so a driver starts from what it needs) and export it with
//! [`export_driver!`](crate::export_driver). The bindings are generated here
//! from the WIT shipped inside this crate, so a driver outside this
//! repository needs only this crate and `cargo build --target wasm32-wasip2`.
//!
//! A driver touches files only through [`fs`]: paths relative to its home,
//! resolved by the host beneath it; the native fast paths (`unpack`, `pack`,
//! `copy-tree`, …) keep layer bytes on the host side.

/// The generated bindings of the `driver-plugin` world.
#[cfg(not(gantry_native))]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "driver-plugin",
        runtime_path: "wit_bindgen::rt",
        pub_export_macro: true,
        export_macro_name: "export_world",
        default_bindings_module: "gantry_kit::driver::bindings",
    });
}

#[cfg(not(gantry_native))]
pub use bindings::gantry::plugin::fs;
#[cfg(not(gantry_native))]
pub use bindings::gantry::plugin::fs::{Change, ChangeKind, OverlayMount, WhiteoutMode};
#[cfg(not(gantry_native))]
pub use bindings::gantry::plugin::types::{ByteStream, Error};

/// The same API over the native C ABI (feature `native`, a non-wasm target).
#[cfg(gantry_native)]
#[doc(hidden)]
pub mod native;
#[cfg(gantry_native)]
pub use native::{fs, ByteStream, Change, ChangeKind, Error, OverlayMount, WhiteoutMode};

fn not_implemented<T>(what: &str) -> Result<T, Error> {
    Err(Error::Unsupported(format!("{what} is not implemented")))
}

/// What a graph driver does, after Docker's graphdriver. Layer ids are
/// opaque names the core chooses; paths are relative to the driver's home.
/// Every method has a default: `init`, `put` and `cleanup` succeed, `exists`
/// says no, `status` is empty, the rest fail with "`x` is not implemented".
pub trait Driver {
    /// Called once per instance with the `options` of the driver's config table.
    fn init(options: Vec<(String, String)>) -> Result<(), Error> {
        let _ = options;
        Ok(())
    }
    /// Creates read-only layer `id` on top of `parent`.
    fn create(id: String, parent: Option<String>) -> Result<(), Error> {
        let _ = (id, parent);
        not_implemented("create")
    }
    /// Creates a writable layer `id` on top of `parent`.
    fn create_read_write(id: String, parent: Option<String>) -> Result<(), Error> {
        let _ = (id, parent);
        not_implemented("create-read-write")
    }
    /// Removes layer `id`.
    fn remove(id: String) -> Result<(), Error> {
        let _ = id;
        not_implemented("remove")
    }
    /// The directory holding layer `id`'s full tree, relative to the home.
    fn get(id: String, mount_label: String) -> Result<String, Error> {
        let _ = (id, mount_label);
        not_implemented("get")
    }
    /// Releases what `get` acquired.
    fn put(id: String) -> Result<(), Error> {
        let _ = id;
        Ok(())
    }
    /// Whether layer `id` exists.
    fn exists(id: String) -> bool {
        let _ = id;
        false
    }
    /// Key/value lines describing the driver.
    fn status() -> Vec<(String, String)> {
        Vec::new()
    }
    /// Applies the tar stream `diff` to layer `id`; returns the bytes of
    /// regular files written. The host verifies the diffID and the size.
    fn apply_diff(id: String, parent: Option<String>, diff: &ByteStream) -> Result<u64, Error> {
        let _ = (id, parent, diff);
        not_implemented("apply-diff")
    }
    /// The tar of what layer `id` changed relative to `parent`.
    fn diff(id: String, parent: Option<String>) -> Result<ByteStream, Error> {
        let _ = (id, parent);
        not_implemented("diff")
    }
    /// What layer `id` changed relative to `parent`.
    fn changes(id: String, parent: Option<String>) -> Result<Vec<Change>, Error> {
        let _ = (id, parent);
        not_implemented("changes")
    }
    /// The size of what layer `id` changed relative to `parent`.
    fn diff_size(id: String, parent: Option<String>) -> Result<u64, Error> {
        let _ = (id, parent);
        not_implemented("diff-size")
    }
    /// Releases everything before the host stops using the driver.
    fn cleanup() -> Result<(), Error> {
        Ok(())
    }
}

/// Adapts a [`Driver`] to the generated export trait; used by [`export_driver!`](crate::export_driver).
#[doc(hidden)]
pub struct DriverExport<T>(core::marker::PhantomData<T>);

#[cfg(not(gantry_native))]
impl<T: Driver> bindings::exports::gantry::plugin::driver::Guest for DriverExport<T> {
    fn init(options: Vec<(String, String)>) -> Result<(), Error> {
        T::init(options)
    }
    fn create(id: String, parent: Option<String>) -> Result<(), Error> {
        T::create(id, parent)
    }
    fn create_read_write(id: String, parent: Option<String>) -> Result<(), Error> {
        T::create_read_write(id, parent)
    }
    fn remove(id: String) -> Result<(), Error> {
        T::remove(id)
    }
    fn get(id: String, mount_label: String) -> Result<String, Error> {
        T::get(id, mount_label)
    }
    fn put(id: String) -> Result<(), Error> {
        T::put(id)
    }
    fn exists(id: String) -> bool {
        T::exists(id)
    }
    fn status() -> Vec<(String, String)> {
        T::status()
    }
    fn apply_diff(id: String, parent: Option<String>, diff: &ByteStream) -> Result<u64, Error> {
        T::apply_diff(id, parent, diff)
    }
    fn diff(id: String, parent: Option<String>) -> Result<ByteStream, Error> {
        T::diff(id, parent)
    }
    fn changes(id: String, parent: Option<String>) -> Result<Vec<Change>, Error> {
        T::changes(id, parent)
    }
    fn diff_size(id: String, parent: Option<String>) -> Result<u64, Error> {
        T::diff_size(id, parent)
    }
    fn cleanup() -> Result<(), Error> {
        T::cleanup()
    }
}

/// Exports a type implementing [`Driver`] as the component's driver:
/// `gantry_kit::export_driver!(MyDriver);` once, at the crate's root. With
/// the kit's `native` feature on a native target, the same line exports the
/// native ABI's symbols instead (see `gantry-native-abi`).
#[cfg(not(gantry_native))]
#[macro_export]
macro_rules! export_driver {
    ($t:ty) => {
        type __GantryKitDriverExport = $crate::driver::DriverExport<$t>;
        $crate::driver::bindings::export_world!(__GantryKitDriverExport with_types_in $crate::driver::bindings);
    };
}

/// Exports a type implementing [`Driver`] through the native C ABI.
#[cfg(gantry_native)]
#[macro_export]
macro_rules! export_driver {
    ($t:ty) => {
        #[no_mangle]
        pub extern "C" fn gantry_native_abi() -> u32 {
            $crate::native_abi::ABI_VERSION
        }
        #[no_mangle]
        pub extern "C" fn gantry_native_contract() -> *const ::std::ffi::c_char {
            $crate::driver::native::CONTRACT.as_ptr()
        }
        #[no_mangle]
        pub extern "C" fn gantry_native_kind() -> *const ::std::ffi::c_char {
            c"driver".as_ptr()
        }
        /// # Safety
        /// Called by the gantry host only, with the arguments the native ABI names.
        #[no_mangle]
        pub unsafe extern "C" fn gantry_native_driver_call(
            host: *const $crate::native_abi::HostTable,
            req: *const u8,
            len: usize,
            sink: *mut ::std::ffi::c_void,
            sink_fn: $crate::native_abi::SinkFn,
        ) {
            // SAFETY: forwarded from the host under the ABI's contract.
            unsafe { $crate::driver::native::dispatch::<$t>(host, req, len, sink, sink_fn) }
        }
    };
}
