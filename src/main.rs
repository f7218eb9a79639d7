//! The dbagent binary: everything lives in the library; this only runs the CLI.

fn main() -> std::process::ExitCode {
    dbagent::init::become_init_if_pid_1();
    // One malloc arena for every thread. glibc's default (up to 8 per core) lets each of the
    // runtime's blocking threads keep the buffers it freed: a 4.5 GB file-level restore peaked
    // at 80 MiB with it and at 49 MiB with one arena, as fast (bench/results/memory.md). The
    // threads allocate a few large buffers per second, so they do not contend for it.
    //
    // And a fixed threshold above which a buffer is mapped on its own and returned to the
    // system when freed. glibc's default starts at 128 KiB and rises to the size of each
    // mapped buffer freed, so after the first 8 MiB upload part was freed every later part
    // came from the heap, where freed parts and blobs left holes that stayed resident: the
    // peak RSS of identical backups moved between 39 and 70 MiB. At 2 MiB the upload parts
    // (8 MiB) and ranged downloads (4 MiB) are mapped and unmapped, while the 1 MiB blob
    // buffers, reused all the time, stay in the heap: an S3 backup with four workers peaked at
    // 47–49 MiB in every run, its time unchanged.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt before any other thread exists, with valid parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
    }
    dbagent::cli::run()
}
