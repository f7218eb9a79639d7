//! The dbagent binary: everything lives in the library; this only runs the CLI.

fn main() -> std::process::ExitCode {
    // One malloc arena for every thread. glibc's default (up to 8 per core) lets each of the
    // runtime's blocking threads keep the buffers it freed: a 4.5 GB file-level restore peaked
    // at 80 MiB with it and at 49 MiB with one arena, as fast (bench/results/memory.md). The
    // threads allocate a few large buffers per second, so they do not contend for it.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt before any other thread exists, with a valid parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    dbagent::cli::run()
}
