//! glibc malloc settings for the broker's allocation pattern, set once before any thread starts.
//!
//! Every SSH packet passes through a freshly allocated buffer of up to 32 KiB (russh). Under
//! glibc's defaults the heap top is handed back to the kernel whenever 128 KiB lie free there,
//! and faulted in again, zeroed, by the next packets: page faults and zeroing were ~15% of the
//! broker's CPU in bulk transfers (docs/benchmark.md). Keeping freed memory for reuse removes
//! that. The cost is bounded: at most `TRIM_THRESHOLD` of freed heap stays mapped per arena
//! after a burst, and `TOP_PAD` of untouched address space is not resident.

/// Free memory at the heap top kept rather than returned to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 64 << 20;
/// Extra the heap grows by at once, so a burst does not grow it packet by packet.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TOP_PAD: libc::c_int = 16 << 20;

/// Applies the settings; anything but glibc keeps its allocator's defaults. When the operator
/// sets `GLIBC_TUNABLES` (glibc reads it at start), that is used as given and this does nothing.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("GLIBC_TUNABLES").is_some() {
            return;
        }
        // SAFETY: mallopt only changes allocator parameters; it is called from the main thread
        // before the runtime or any other thread exists, as glibc recommends.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
        }
    }
}
