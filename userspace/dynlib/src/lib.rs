//! A C library loaded at run time into a table of the functions a crate
//! calls, for backends whose libraries are large (libnbd with GnuTLS and
//! ICU, librbd with librados and Boost): loaded with dlopen(3) when the
//! first device of that kind is opened, they are mapped into no other
//! daemon, and `fuse-blk` starts on machines that lack them.
//!
//! [`function_table!`] declares the table; [`open`] loads the library
//! (with libloading, which owns dlopen's and dlerror's details) and the
//! table's `look_up` fills it. Each crate keeps its own `load`, with the
//! error naming its package.
#![deny(missing_docs)]

pub use libloading;

/// Opens the shared object `soname` (the ABI's soname, such as
/// `libnbd.so.0`, so that only the run-time package is needed) for the
/// rest of the process: the tables point into it. Resolves every symbol
/// now (RTLD_NOW), so that one missing fails here, not in mid-request.
/// The error is dlerror's text.
pub fn open(soname: &str) -> Result<&'static libloading::Library, String> {
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    // SAFETY: loading runs the library's initialisers; the libraries
    // loaded this way (libnbd, librbd) are ordinary C libraries whose
    // initialisers only set up their own state.
    let library =
        unsafe { Library::open(Some(soname), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| e.to_string())?;
    Ok(Box::leak(Box::new(library.into())))
}

/// The function `name` of `library`, as a function pointer of type `F`.
///
/// # Safety
/// `F` must be an `unsafe extern "C" fn` type matching the C declaration
/// of `name` in `library`.
pub unsafe fn function<F: Copy>(
    library: &'static libloading::Library,
    name: &str,
) -> Result<F, String> {
    // SAFETY: the caller's promise that F is the function's type; the
    // library is never unloaded, so the pointer stays valid.
    let symbol = unsafe { library.get::<F>(name.as_bytes()) };
    symbol.map(|f| *f).map_err(|_| format!("no {name}"))
}

/// Declares a struct of `unsafe extern "C" fn` pointers, one field per
/// function named, and its `look_up(library)`, which fills it from a
/// library [`open`] returned. A function missing from the library makes
/// `look_up` fail with `no NAME`.
///
/// ```
/// use std::ffi::{c_char, c_void};
/// fuse_blk_dynlib::function_table! {
///     /// libfoo's functions.
///     pub struct Functions {
///         fn foo_open(path: *const c_char) -> *mut c_void;
///     }
/// }
/// ```
#[macro_export]
macro_rules! function_table {
    (
        $(#[$meta:meta])*
        $vis:vis struct $table:ident {
            $( $(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty; )*
        }
    ) => {
        $(#[$meta])*
        #[allow(non_snake_case)]
        $vis struct $table {
            $( $(#[$doc])* pub $name: unsafe extern "C" fn($($ty),*) -> $ret, )*
        }

        impl $table {
            /// Looks every function up in `library`.
            ///
            /// # Safety
            /// `library` must be the C library whose functions of these
            /// names have the signatures declared here.
            $vis unsafe fn look_up(
                library: &'static $crate::libloading::Library,
            ) -> Result<$table, String> {
                Ok($table {
                    $( $name: {
                        // SAFETY: the caller's promise about `library`.
                        unsafe {
                            $crate::function::<unsafe extern "C" fn($($ty),*) -> $ret>(
                                library,
                                stringify!($name),
                            )?
                        }
                    }, )*
                })
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use std::ffi::{c_char, c_int};

    function_table! {
        /// Two of libc's functions, to test the table on a library every
        /// machine has.
        struct Libc {
            fn abs(value: c_int) -> c_int;
            fn strlen(text: *const c_char) -> usize;
        }
    }

    function_table! {
        #[allow(dead_code)] // never filled: its look-up fails
        struct Missing {
            fn no_such_function_in_libc() -> c_int;
        }
    }

    #[test]
    fn a_table_calls_the_library() {
        let library = super::open("libc.so.6").unwrap();
        // SAFETY: libc's abs and strlen have these signatures.
        let libc = unsafe { Libc::look_up(library) }.unwrap();
        // SAFETY: plain calls with valid arguments.
        unsafe {
            assert_eq!((libc.abs)(-7), 7);
            assert_eq!((libc.strlen)(c"four".as_ptr()), 4);
        }
    }

    #[test]
    fn a_missing_library_or_function_is_a_message() {
        let error = super::open("libfuse-blk-no-such-library.so.0").unwrap_err();
        assert!(
            error.contains("libfuse-blk-no-such-library.so.0"),
            "{error}"
        );
        let library = super::open("libc.so.6").unwrap();
        // SAFETY: the look-up fails before any pointer is used.
        let error = unsafe { Missing::look_up(library) }.err().unwrap();
        assert_eq!(error, "no no_such_function_in_libc");
    }
}
