//! Memory hints for large fresh outputs.

/// Size of a transparent huge page on x86-64 and aarch64 Linux.
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the 2 MiB-aligned interior of `out` with transparent huge
/// pages (`madvise(MADV_HUGEPAGE)`) before it is first written: a fresh allocation then
/// takes one page fault per 2 MiB instead of one per 4 KiB, which is most of the cost of
/// writing a new tensor. Only whole huge pages inside the buffer are advised, so no other
/// memory is touched; memory already faulted in keeps its pages (the advice only matters
/// for later faults). Advisory: a kernel that refuses (THP `never`, not Linux) changes
/// nothing but speed, so the result is ignored.
pub(crate) fn advise_huge_pages<T>(out: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        let start = out.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(out);
        let first = start.next_multiple_of(HUGE_PAGE);
        let last = end - end % HUGE_PAGE;
        if last > first {
            // SAFETY: [first, last) lies inside `out`, which we borrow mutably; the advice
            // changes how future faults are served, never the contents of the memory.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = out;
}
