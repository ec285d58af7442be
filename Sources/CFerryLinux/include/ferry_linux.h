// Linux syscall shims for Ferry's file endpoint.
//
// Swift's Glibc module lacks O_DIRECT, the fallocate modes, SEEK_DATA/SEEK_HOLE and the block
// device ioctls, and liburing's header clashes with Glibc over fd_set, so this header declares
// only plain C types: liburing stays inside ferry_linux.c. Every function that can fail returns
// a negative errno (never touches the caller's errno), so Swift needs no errno juggling.
#pragma once

#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// Open flags and fallocate modes that Swift's Glibc does not export.
extern const int ferry_O_DIRECT;
extern const int ferry_O_DSYNC;
extern const int ferry_FALLOC_FL_KEEP_SIZE;
extern const int ferry_FALLOC_FL_PUNCH_HOLE;
extern const int ferry_FALLOC_FL_ZERO_RANGE;
/// Per-write O_DSYNC for pwritev2 and io_uring writes (forced unit access).
extern const int ferry_RWF_DSYNC;

/// open(2); returns the fd or -errno.
int ferry_open(const char *path, int flags, unsigned mode);
/// close(2) ignoring EINTR; returns 0 or -errno.
int ferry_close(int fd);

/// fstat(2) reduced to what Ferry needs. kind: 0 other, 1 regular file, 2 block device, 3 directory.
typedef struct ferry_stat {
    int kind;
    int64_t size;
    int64_t blocks512;
    uint64_t dev;
    uint64_t ino;
} ferry_stat;
int ferry_fstat(int fd, ferry_stat *out);
/// stat(2) by path (follows symlinks).
int ferry_stat_path(const char *path, ferry_stat *out);

/// ftruncate(2).
int ferry_ftruncate(int fd, int64_t size);
/// fallocate(2).
int ferry_fallocate(int fd, int mode, int64_t offset, int64_t length);
/// fdatasync(2) (fsync(2) if datasync is 0).
int ferry_fsync(int fd, int datasync);
/// sync_file_range(SYNC_FILE_RANGE_WRITE): starts write-back of the range (0, 0: the whole file); 0 or -errno.
int ferry_sync_file_range_write(int fd, int64_t offset, int64_t length);
/// lseek(fd, offset, SEEK_DATA / SEEK_HOLE); returns the new offset or -errno (-ENXIO past the last data).
int64_t ferry_seek_data(int fd, int64_t offset);
int64_t ferry_seek_hole(int fd, int64_t offset);

/// ppoll(2) on `count` struct pollfd at `fds`, waiting at most `timeout_ns` (forever if
/// negative): poll(2) counts in whole milliseconds, too coarse for a 1 ms delay.
int ferry_poll_ns(void *fds, unsigned count, int64_t timeout_ns);

/// copy_file_range(2) of all `length` bytes (looping over short copies); 0 or -errno
/// (-EXDEV, -EOPNOTSUPP, -EINVAL: the kernel cannot here, nothing needs undoing).
int ferry_copy_file_range(int in_fd, int64_t in_offset, int out_fd, int64_t out_offset, int64_t length);
/// 1 if another open file description holds an OFD lock on byte `offset` that a write lock
/// would conflict with (QEMU marks the permissions an open image holds this way), 0 if not,
/// or -errno.
int ferry_ofd_lock_held(int fd, int64_t offset);
/// cachestat(2) over the whole file: bytes of it in the page cache. -ENOSYS on kernels
/// before 6.5.
int64_t ferry_cached_bytes(int fd);
/// cachestat(2) over the whole file, in bytes: in the page cache, dirty, under write-back.
typedef struct ferry_cache_state {
    int64_t cached;
    int64_t dirty;
    int64_t writeback;
} ferry_cache_state;
int ferry_cachestat(int fd, ferry_cache_state *out);

/// pread(2)/pwritev2(2) of at most `length` bytes, retried on EINTR; returns bytes moved or -errno.
/// `rw_flags` (RWF_DSYNC) selects pwritev2; 0 uses plain pwrite.
int64_t ferry_pread(int fd, void *buffer, size_t length, int64_t offset);
/// preadv2(2) with RWF_NOWAIT: only what the page cache holds, never waiting for the disk.
/// Returns bytes read (short where the cache stops; 0 at the end of the file) or -errno
/// (EAGAIN when the first page is not cached, EOPNOTSUPP where the file system cannot).
int64_t ferry_pread_cached(int fd, void *buffer, size_t length, int64_t offset);
int64_t ferry_pwrite(int fd, const void *buffer, size_t length, int64_t offset, int rw_flags);

/// Block devices: size in bytes (BLKGETSIZE64) and logical block size (BLKSSZGET).
int ferry_blk_size(int fd, uint64_t *size);
int ferry_blk_logical_block_size(int fd, uint32_t *size);
/// BLKZEROOUT / BLKDISCARD over [offset, offset + length); both must be logical-block aligned.
int ferry_blk_zeroout(int fd, uint64_t offset, uint64_t length);
int ferry_blk_discard(int fd, uint64_t offset, uint64_t length);

/// statx(STATX_DIOALIGN): 1 with the alignments filled in when the kernel reports them,
/// 0 when it does not, or -errno.
int ferry_dio_alignment(int fd, uint32_t *memory_align, uint32_t *offset_align);


/// eventfd(2) for waking an I/O thread; signal adds 1 to its counter.
int ferry_eventfd_create(void);
int ferry_eventfd_signal(int fd);

/// An io_uring (liburing) owned by one thread. Opaque to Swift.
typedef struct ferry_ring ferry_ring;

/// io_uring_queue_init; NULL with *error = -errno when the kernel refuses (seccomp, sysctl
/// kernel.io_uring_disabled, old kernel).
ferry_ring *ferry_ring_create(unsigned entries, int *error);
/// io_uring_queue_exit: cancels whatever is still queued and frees the ring.
void ferry_ring_destroy(ferry_ring *ring);

/// Queue one SQE; returns 0, or -EBUSY when the submission queue is full.
int ferry_ring_prep_read(ferry_ring *ring, int fd, void *buffer, unsigned length, int64_t offset, uint64_t user_data);
int ferry_ring_prep_write(ferry_ring *ring, int fd, const void *buffer, unsigned length, int64_t offset, int rw_flags, uint64_t user_data);
int ferry_ring_prep_fsync(ferry_ring *ring, int fd, int datasync, uint64_t user_data);
int ferry_ring_prep_fallocate(ferry_ring *ring, int fd, int mode, int64_t offset, int64_t length, uint64_t user_data);

/// Submits what is queued and sleeps until at least `wait_nr` completions are ready.
/// Returns the number submitted or -errno (-EINTR is worth retrying).
int ferry_ring_submit_and_wait(ferry_ring *ring, unsigned wait_nr);
/// Takes up to `max` ready completions (user_data and result) and marks them seen.
unsigned ferry_ring_reap(ferry_ring *ring, uint64_t *user_data, int32_t *result, unsigned max);

/// A blocking pipe of `size` bytes or the largest allowed below (O_CLOEXEC); 0 or -errno.
int ferry_pipe(int fds[2], int size);
/// splice(2) without offsets, SPLICE_F_MOVE, and SPLICE_F_NONBLOCK if `nonblocking`; bytes
/// moved or -errno.
long ferry_splice(int from, int to, size_t count, int nonblocking);

/// Fixed malloc mmap and trim thresholds (mallopt), instead of glibc's adaptive ones.
void ferry_malloc_thresholds(int mmap_threshold, int trim_threshold);

/// TCP_CORK on or off: while on, the kernel sends only full segments; off sends what it holds.
int ferry_tcp_cork(int fd, int on);
/// Segments with data sent on a TCP socket so far (tcp_info.tcpi_data_segs_out), or -errno.
int64_t ferry_tcp_data_segments_sent(int fd);

#ifdef __cplusplus
}
#endif
