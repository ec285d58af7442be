// See include/ferry_rbd.h.
#include <errno.h>
#include <pthread.h>
#include <rbd/librbd.h>

#include "ferry_load.h"
#include "ferry_rbd.h"

// X(return type, name, (parameters), (arguments)); each is looked up in librados, then
// librbd.
#define FERRY_RBD_FUNCTIONS(X) \
    X(int, rados_conf_read_file, (rados_t cluster, const char *path), (cluster, path)) \
    X(int, rados_conf_set, (rados_t cluster, const char *option, const char *value), (cluster, option, value)) \
    X(int, rados_connect, (rados_t cluster), (cluster)) \
    X(void, rados_shutdown, (rados_t cluster), (cluster)) \
    X(int, rados_ioctx_create, (rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx), (cluster, pool_name, ioctx)) \
    X(void, rados_ioctx_destroy, (rados_ioctx_t io), (io)) \
    X(void, rados_ioctx_set_namespace, (rados_ioctx_t io, const char *nspace), (io, nspace)) \
    X(void, rados_set_pool_full_try, (rados_ioctx_t io), (io)) \
    X(int, rbd_open, (rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name), (io, name, image, snap_name)) \
    X(int, rbd_open_read_only, (rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name), \
        (io, name, image, snap_name)) \
    X(int, rbd_close, (rbd_image_t image), (image)) \
    X(int, rbd_stat, (rbd_image_t image, rbd_image_info_t *info, size_t infosize), (image, info, infosize)) \
    X(int, rbd_get_features, (rbd_image_t image, uint64_t *features), (image, features)) \
    X(int, rbd_get_flags, (rbd_image_t image, uint64_t *flags), (image, flags)) \
    X(int, rbd_create4, (rados_ioctx_t io, const char *name, uint64_t size, rbd_image_options_t opts), (io, name, size, opts)) \
    X(int, rbd_remove, (rados_ioctx_t io, const char *name), (io, name)) \
    X(void, rbd_image_options_create, (rbd_image_options_t *opts), (opts)) \
    X(void, rbd_image_options_destroy, (rbd_image_options_t opts), (opts)) \
    X(int, rbd_image_options_set_string, (rbd_image_options_t opts, int optname, const char *optval), (opts, optname, optval)) \
    X(int, rbd_image_options_set_uint64, (rbd_image_options_t opts, int optname, uint64_t optval), (opts, optname, optval)) \
    X(ssize_t, rbd_aio_get_return_value, (rbd_completion_t c), (c)) \
    X(void, rbd_aio_release, (rbd_completion_t c), (c)) \
    X(int, rbd_aio_read, (rbd_image_t image, uint64_t off, size_t len, char *buf, rbd_completion_t c), (image, off, len, buf, c)) \
    X(int, rbd_aio_write, (rbd_image_t image, uint64_t off, size_t len, const char *buf, rbd_completion_t c), \
        (image, off, len, buf, c)) \
    X(int, rbd_aio_discard, (rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c), (image, off, len, c)) \
    X(int, rbd_aio_write_zeroes, (rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c, int zero_flags, int op_flags), \
        (image, off, len, c, zero_flags, op_flags)) \
    X(int, rbd_aio_flush, (rbd_image_t image, rbd_completion_t c), (image, c)) \
    X(int, rbd_diff_iterate2, (rbd_image_t image, const char *fromsnapname, uint64_t ofs, uint64_t len, \
        uint8_t include_parent, uint8_t whole_object, int (*cb)(uint64_t, size_t, int, void *), void *arg), \
        (image, fromsnapname, ofs, len, include_parent, whole_object, cb, arg))

enum {
    FERRY_RBD_FUNCTIONS(FERRY_INDEX)
    index_rados_create,
    index_rbd_aio_create_completion,
    functionCount
};

static const char *const names[functionCount] = {
    FERRY_RBD_FUNCTIONS(FERRY_NAME)
    "rados_create",
    "rbd_aio_create_completion",
};

FERRY_LOADER(ferry_rbd_load_error, "librbd1", "librados.so.2", "librbd.so.1")

// Every function but these two is only reached with a cluster handle, so after rados_create
// succeeded.
FERRY_RBD_FUNCTIONS(FERRY_FORWARD)

int rados_create(rados_t *cluster, const char *id) {
    if (ferry_rbd_load_error()) return -ENOSYS;
    return FERRY_CALL(int, rados_create, (rados_t *, const char *))(cluster, id);
}

int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c) {
    if (ferry_rbd_load_error()) return -ENOSYS;
    return FERRY_CALL(int, rbd_aio_create_completion, (void *, rbd_callback_t, rbd_completion_t *))(cb_arg, complete_cb, c);
}
