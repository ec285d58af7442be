// Thin wrappers around Linux syscalls and liburing; see include/ferry_linux.h.
#define _GNU_SOURCE
#include <features.h>
#include <liburing.h>
#include <malloc.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ferry_linux.h"

const int ferry_O_DIRECT = O_DIRECT;
const int ferry_O_DSYNC = O_DSYNC;
const int ferry_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
const int ferry_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
const int ferry_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
const int ferry_RWF_DSYNC = RWF_DSYNC;

int ferry_open(const char *path, int flags, unsigned mode) {
    int fd;
    do { fd = open(path, flags | O_CLOEXEC, (mode_t)mode); } while (fd < 0 && errno == EINTR);
    return fd < 0 ? -errno : fd;
}

int ferry_close(int fd) {
    // Linux releases the fd even when close reports EINTR: never retry.
    return close(fd) < 0 && errno != EINTR ? -errno : 0;
}

static void fill_stat(const struct stat *st, ferry_stat *out) {
    if (S_ISREG(st->st_mode)) out->kind = 1;
    else if (S_ISBLK(st->st_mode)) out->kind = 2;
    else if (S_ISDIR(st->st_mode)) out->kind = 3;
    else out->kind = 0;
    out->size = (int64_t)st->st_size;
    out->blocks512 = (int64_t)st->st_blocks;
    out->dev = (uint64_t)st->st_dev;
    out->ino = (uint64_t)st->st_ino;
}

int ferry_fstat(int fd, ferry_stat *out) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    fill_stat(&st, out);
    return 0;
}

int ferry_stat_path(const char *path, ferry_stat *out) {
    struct stat st;
    if (stat(path, &st) < 0) return -errno;
    fill_stat(&st, out);
    return 0;
}

int ferry_ftruncate(int fd, int64_t size) {
    int r;
    do { r = ftruncate(fd, (off_t)size); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int ferry_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    int r;
    do { r = fallocate(fd, mode, (off_t)offset, (off_t)length); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int ferry_fsync(int fd, int datasync) {
    int r;
    do { r = datasync ? fdatasync(fd) : fsync(fd); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int ferry_sync_file_range_write(int fd, int64_t offset, int64_t length) {
    int r;
    do { r = sync_file_range(fd, (off_t)offset, (off_t)length, SYNC_FILE_RANGE_WRITE); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int64_t ferry_seek_data(int fd, int64_t offset) {
    off_t r = lseek(fd, (off_t)offset, SEEK_DATA);
    return r < 0 ? -errno : (int64_t)r;
}

int64_t ferry_seek_hole(int fd, int64_t offset) {
    off_t r = lseek(fd, (off_t)offset, SEEK_HOLE);
    return r < 0 ? -errno : (int64_t)r;
}

int ferry_poll_ns(void *fds, unsigned count, int64_t timeout_ns) {
    struct timespec ts = { .tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000 };
    int r = ppoll((struct pollfd *)fds, count, timeout_ns < 0 ? NULL : &ts, NULL);
    return r < 0 ? -errno : r;
}

int ferry_copy_file_range(int in_fd, int64_t in_offset, int out_fd, int64_t out_offset, int64_t length) {
    loff_t in = in_offset, out = out_offset;
    while (length > 0) {
        ssize_t n = copy_file_range(in_fd, &in, out_fd, &out, (size_t)length, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (n == 0) return -EIO; /* the source ended early */
        length -= n;
    }
    return 0;
}

int ferry_ofd_lock_held(int fd, int64_t offset) {
    struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = offset, .l_len = 1, .l_pid = 0 };
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0) return -errno;
    return fl.l_type == F_UNLCK ? 0 : 1;
}

int ferry_cachestat(int fd, ferry_cache_state *out) {
#ifndef __NR_cachestat
#define __NR_cachestat 451 /* the same number on every architecture */
#endif
    struct { uint64_t off, len; } range = { 0, 0 }; /* len 0: to the end of the file */
    struct { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; } cs;
    if (syscall(__NR_cachestat, fd, &range, &cs, 0) < 0) return -errno;
    long page = sysconf(_SC_PAGESIZE);
    int64_t p = page > 0 ? page : 4096;
    out->cached = (int64_t)cs.nr_cache * p;
    out->dirty = (int64_t)cs.nr_dirty * p;
    out->writeback = (int64_t)cs.nr_writeback * p;
    return 0;
}

int64_t ferry_cached_bytes(int fd) {
    ferry_cache_state st;
    int r = ferry_cachestat(fd, &st);
    return r < 0 ? r : st.cached;
}

int64_t ferry_pread(int fd, void *buffer, size_t length, int64_t offset) {
    ssize_t r;
    do { r = pread(fd, buffer, length, (off_t)offset); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : (int64_t)r;
}

int64_t ferry_pread_cached(int fd, void *buffer, size_t length, int64_t offset) {
    struct iovec iov = { .iov_base = buffer, .iov_len = length };
    ssize_t r;
    do { r = preadv2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : (int64_t)r;
}

int64_t ferry_pwrite(int fd, const void *buffer, size_t length, int64_t offset, int rw_flags) {
    ssize_t r;
    if (rw_flags) {
        struct iovec iov = { .iov_base = (void *)buffer, .iov_len = length };
        do { r = pwritev2(fd, &iov, 1, (off_t)offset, rw_flags); } while (r < 0 && errno == EINTR);
    } else {
        do { r = pwrite(fd, buffer, length, (off_t)offset); } while (r < 0 && errno == EINTR);
    }
    return r < 0 ? -errno : (int64_t)r;
}

int ferry_blk_size(int fd, uint64_t *size) {
    return ioctl(fd, BLKGETSIZE64, size) < 0 ? -errno : 0;
}

int ferry_blk_logical_block_size(int fd, uint32_t *size) {
    int ssz = 0;
    if (ioctl(fd, BLKSSZGET, &ssz) < 0) return -errno;
    *size = (uint32_t)ssz;
    return 0;
}

int ferry_blk_zeroout(int fd, uint64_t offset, uint64_t length) {
    uint64_t range[2] = { offset, length };
    int r;
    do { r = ioctl(fd, BLKZEROOUT, range); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int ferry_blk_discard(int fd, uint64_t offset, uint64_t length) {
    uint64_t range[2] = { offset, length };
    int r;
    do { r = ioctl(fd, BLKDISCARD, range); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int ferry_dio_alignment(int fd, uint32_t *memory_align, uint32_t *offset_align) {
#ifdef STATX_DIOALIGN
    struct statx stx;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0) return -errno;
    if (!(stx.stx_mask & STATX_DIOALIGN)) return 0;
    *memory_align = stx.stx_dio_mem_align;
    *offset_align = stx.stx_dio_offset_align;
    return 1;
#else
    (void)fd; (void)memory_align; (void)offset_align;
    return 0;
#endif
}

int ferry_eventfd_create(void) {
    int fd = eventfd(0, EFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ferry_eventfd_signal(int fd) {
    uint64_t one = 1;
    ssize_t r;
    do { r = write(fd, &one, sizeof one); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

struct ferry_ring {
    struct io_uring ring;
};

ferry_ring *ferry_ring_create(unsigned entries, int *error) {
    ferry_ring *r = calloc(1, sizeof *r);
    if (!r) { *error = -ENOMEM; return NULL; }
    int rc = io_uring_queue_init(entries, &r->ring, 0);
    if (rc < 0) { free(r); *error = rc; return NULL; }
    *error = 0;
    return r;
}

void ferry_ring_destroy(ferry_ring *r) {
    if (!r) return;
    io_uring_queue_exit(&r->ring);
    free(r);
}

int ferry_ring_prep_read(ferry_ring *r, int fd, void *buffer, unsigned length, int64_t offset, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_read(sqe, fd, buffer, length, (__u64)offset);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ferry_ring_prep_write(ferry_ring *r, int fd, const void *buffer, unsigned length, int64_t offset, int rw_flags, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_write(sqe, fd, buffer, length, (__u64)offset);
    sqe->rw_flags = rw_flags;
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ferry_ring_prep_fsync(ferry_ring *r, int fd, int datasync, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_fsync(sqe, fd, datasync ? IORING_FSYNC_DATASYNC : 0);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ferry_ring_prep_fallocate(ferry_ring *r, int fd, int mode, int64_t offset, int64_t length, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_fallocate(sqe, fd, mode, (off_t)offset, (off_t)length);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ferry_ring_submit_and_wait(ferry_ring *r, unsigned wait_nr) {
    return io_uring_submit_and_wait(&r->ring, wait_nr);
}

unsigned ferry_ring_reap(ferry_ring *r, uint64_t *user_data, int32_t *result, unsigned max) {
    struct io_uring_cqe *cqes[64];
    if (max > 64) max = 64;
    unsigned n = io_uring_peek_batch_cqe(&r->ring, cqes, max);
    for (unsigned i = 0; i < n; i++) {
        user_data[i] = io_uring_cqe_get_data64(cqes[i]);
        result[i] = cqes[i]->res;
    }
    if (n) io_uring_cq_advance(&r->ring, n);
    return n;
}

int ferry_pipe(int fds[2], int size) {
    if (pipe2(fds, O_CLOEXEC) != 0) return -errno;
    // Best effort: the largest allowed up to `size` (a smaller pipe works, in more steps).
    while (size > 65536 && fcntl(fds[1], F_SETPIPE_SZ, size) < 0) size /= 2;
    return 0;
}

long ferry_splice(int from, int to, size_t count, int nonblocking) {
    ssize_t n = splice(from, NULL, to, NULL, count, SPLICE_F_MOVE | (nonblocking ? SPLICE_F_NONBLOCK : 0));
    return n < 0 ? -errno : (long)n;
}

int ferry_tcp_cork(int fd, int on) {
    return setsockopt(fd, IPPROTO_TCP, TCP_CORK, &on, sizeof on) < 0 ? -errno : 0;
}

int64_t ferry_tcp_data_segments_sent(int fd) {
    struct tcp_info info;
    socklen_t len = sizeof info;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) < 0) return -errno;
    if (len < offsetof(struct tcp_info, tcpi_data_segs_out) + sizeof info.tcpi_data_segs_out) return -ENOTSUP;
    return info.tcpi_data_segs_out;
}

void ferry_malloc_thresholds(int mmap_threshold, int trim_threshold) {
    (void)mallopt(M_MMAP_THRESHOLD, mmap_threshold);
    (void)mallopt(M_TRIM_THRESHOLD, trim_threshold);
}
