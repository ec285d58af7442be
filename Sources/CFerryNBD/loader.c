// See include/ferry_nbd.h.
#include <errno.h>
#include <pthread.h>
#include <libnbd.h>

#include "ferry_load.h"
#include "ferry_nbd.h"

// X(return type, name, (parameters), (arguments))
#define FERRY_NBD_FUNCTIONS(X) \
    X(int, nbd_add_meta_context, (struct nbd_handle *h, const char *name), (h, name)) \
    X(int64_t, nbd_aio_block_status, (struct nbd_handle *h, uint64_t count, uint64_t offset, \
        nbd_extent_callback extent_callback, nbd_completion_callback completion_callback, uint32_t flags), \
        (h, count, offset, extent_callback, completion_callback, flags)) \
    X(int64_t, nbd_aio_flush, (struct nbd_handle *h, nbd_completion_callback completion_callback, uint32_t flags), \
        (h, completion_callback, flags)) \
    X(int, nbd_aio_connect_uri, (struct nbd_handle *h, const char *uri), (h, uri)) \
    X(int, nbd_aio_disconnect, (struct nbd_handle *h, uint32_t flags), (h, flags)) \
    X(unsigned, nbd_aio_get_direction, (struct nbd_handle *h), (h)) \
    X(int, nbd_aio_is_connecting, (struct nbd_handle *h), (h)) \
    X(int, nbd_aio_is_ready, (struct nbd_handle *h), (h)) \
    X(int, nbd_aio_get_fd, (struct nbd_handle *h), (h)) \
    X(int, nbd_aio_is_closed, (struct nbd_handle *h), (h)) \
    X(int, nbd_aio_is_dead, (struct nbd_handle *h), (h)) \
    X(int, nbd_aio_notify_read, (struct nbd_handle *h), (h)) \
    X(int, nbd_aio_notify_write, (struct nbd_handle *h), (h)) \
    X(int64_t, nbd_aio_pread, (struct nbd_handle *h, void *buf, size_t count, uint64_t offset, \
        nbd_completion_callback completion_callback, uint32_t flags), (h, buf, count, offset, completion_callback, flags)) \
    X(int64_t, nbd_aio_pwrite, (struct nbd_handle *h, const void *buf, size_t count, uint64_t offset, \
        nbd_completion_callback completion_callback, uint32_t flags), (h, buf, count, offset, completion_callback, flags)) \
    X(int64_t, nbd_aio_trim, (struct nbd_handle *h, uint64_t count, uint64_t offset, \
        nbd_completion_callback completion_callback, uint32_t flags), (h, count, offset, completion_callback, flags)) \
    X(int64_t, nbd_aio_zero, (struct nbd_handle *h, uint64_t count, uint64_t offset, \
        nbd_completion_callback completion_callback, uint32_t flags), (h, count, offset, completion_callback, flags)) \
    X(int, nbd_can_fast_zero, (struct nbd_handle *h), (h)) \
    X(int, nbd_can_flush, (struct nbd_handle *h), (h)) \
    X(int, nbd_can_fua, (struct nbd_handle *h), (h)) \
    X(int, nbd_can_meta_context, (struct nbd_handle *h, const char *metacontext), (h, metacontext)) \
    X(int, nbd_can_multi_conn, (struct nbd_handle *h), (h)) \
    X(int, nbd_can_trim, (struct nbd_handle *h), (h)) \
    X(int, nbd_can_zero, (struct nbd_handle *h), (h)) \
    X(int64_t, nbd_get_block_size, (struct nbd_handle *h, int size_type), (h, size_type)) \
    X(int64_t, nbd_get_size, (struct nbd_handle *h), (h)) \
    X(int, nbd_is_read_only, (struct nbd_handle *h), (h)) \
    X(int, nbd_set_handle_name, (struct nbd_handle *h, const char *handle_name), (h, handle_name)) \
    X(int, nbd_set_pread_initialize, (struct nbd_handle *h, bool request), (h, request)) \
    X(int, nbd_shutdown, (struct nbd_handle *h, uint32_t flags), (h, flags))

enum {
    FERRY_NBD_FUNCTIONS(FERRY_INDEX)
    index_nbd_create,
    index_nbd_close,
    index_nbd_get_error,
    index_nbd_get_errno,
    functionCount
};

static const char *const names[functionCount] = {
    FERRY_NBD_FUNCTIONS(FERRY_NAME)
    "nbd_create",
    "nbd_close",
    "nbd_get_error",
    "nbd_get_errno",
};

FERRY_LOADER(ferry_nbd_load_error, "libnbd0", "libnbd.so.0")

// Every function but these four is only reached with a handle, so after nbd_create succeeded.
FERRY_NBD_FUNCTIONS(FERRY_FORWARD)

struct nbd_handle *nbd_create(void) {
    if (ferry_nbd_load_error()) return NULL;
    return FERRY_CALL(struct nbd_handle *, nbd_create, (void))();
}

void nbd_close(struct nbd_handle *h) {
    if (h && !ferry_nbd_load_error()) FERRY_CALL(void, nbd_close, (struct nbd_handle *))(h);
}

const char *nbd_get_error(void) {
    const char *why = ferry_nbd_load_error();
    return why ? why : FERRY_CALL(const char *, nbd_get_error, (void))();
}

int nbd_get_errno(void) {
    return ferry_nbd_load_error() ? ENOSYS : FERRY_CALL(int, nbd_get_errno, (void))();
}
