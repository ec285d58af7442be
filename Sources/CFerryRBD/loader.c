// See include/ferry_rbd.h.
#include <errno.h>
#include <pthread.h>
#include <rbd/librbd.h>

#include "ferry_load.h"
#include "ferry_rbd.h"

// X(library, return type, name, (parameters), (arguments)); each is looked up in librados,
// then librbd, so the library named is only what it documents.
#define FERRY_RBD_FUNCTIONS(X) \
    X(rados, int, rados_conf_read_file, (rados_t cluster, const char *path), (cluster, path)) \
    X(rados, int, rados_conf_set, (rados_t cluster, const char *option, const char *value), (cluster, option, value)) \
    X(rados, int, rados_connect, (rados_t cluster), (cluster)) \
    X(rados, void, rados_shutdown, (rados_t cluster), (cluster)) \
    X(rados, int, rados_ioctx_create, (rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx), (cluster, pool_name, ioctx)) \
    X(rados, void, rados_ioctx_destroy, (rados_ioctx_t io), (io)) \
    X(rados, void, rados_ioctx_set_namespace, (rados_ioctx_t io, const char *nspace), (io, nspace)) \
    X(rados, void, rados_set_pool_full_try, (rados_ioctx_t io), (io)) \
    X(rbd, int, rbd_open, (rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name), (io, name, image, snap_name)) \
    X(rbd, int, rbd_open_read_only, (rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name), \
        (io, name, image, snap_name)) \
    X(rbd, int, rbd_close, (rbd_image_t image), (image)) \
    X(rbd, int, rbd_stat, (rbd_image_t image, rbd_image_info_t *info, size_t infosize), (image, info, infosize)) \
    X(rbd, int, rbd_get_features, (rbd_image_t image, uint64_t *features), (image, features)) \
    X(rbd, int, rbd_get_flags, (rbd_image_t image, uint64_t *flags), (image, flags)) \
    X(rbd, int, rbd_create4, (rados_ioctx_t io, const char *name, uint64_t size, rbd_image_options_t opts), (io, name, size, opts)) \
    X(rbd, int, rbd_remove, (rados_ioctx_t io, const char *name), (io, name)) \
    X(rbd, void, rbd_image_options_create, (rbd_image_options_t *opts), (opts)) \
    X(rbd, void, rbd_image_options_destroy, (rbd_image_options_t opts), (opts)) \
    X(rbd, int, rbd_image_options_set_string, (rbd_image_options_t opts, int optname, const char *optval), (opts, optname, optval)) \
    X(rbd, int, rbd_image_options_set_uint64, (rbd_image_options_t opts, int optname, uint64_t optval), (opts, optname, optval)) \
    X(rbd, ssize_t, rbd_aio_get_return_value, (rbd_completion_t c), (c)) \
    X(rbd, void, rbd_aio_release, (rbd_completion_t c), (c)) \
    X(rbd, int, rbd_aio_read, (rbd_image_t image, uint64_t off, size_t len, char *buf, rbd_completion_t c), (image, off, len, buf, c)) \
    X(rbd, int, rbd_aio_write, (rbd_image_t image, uint64_t off, size_t len, const char *buf, rbd_completion_t c), \
        (image, off, len, buf, c)) \
    X(rbd, int, rbd_aio_discard, (rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c), (image, off, len, c)) \
    X(rbd, int, rbd_aio_write_zeroes, (rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c, int zero_flags, int op_flags), \
        (image, off, len, c, zero_flags, op_flags)) \
    X(rbd, int, rbd_aio_flush, (rbd_image_t image, rbd_completion_t c), (image, c)) \
    X(rbd, int, rbd_diff_iterate2, (rbd_image_t image, const char *fromsnapname, uint64_t ofs, uint64_t len, \
        uint8_t include_parent, uint8_t whole_object, int (*cb)(uint64_t, size_t, int, void *), void *arg), \
        (image, fromsnapname, ofs, len, include_parent, whole_object, cb, arg))

enum {
#define INDEX(lib, ret, name, params, args) index_##name,
    FERRY_RBD_FUNCTIONS(INDEX)
#undef INDEX
    index_rados_create,
    index_rbd_aio_create_completion,
    functionCount
};

static const char *const names[functionCount] = {
#define NAME(lib, ret, name, params, args) #name,
    FERRY_RBD_FUNCTIONS(NAME)
#undef NAME
    "rados_create",
    "rbd_aio_create_completion",
};

static void *slots[functionCount];
static pthread_once_t once = PTHREAD_ONCE_INIT;
static char load_error[512];

static void load(void) {
    static const char *const libraries[] = {"librados.so.2", "librbd.so.1", NULL};
    ferry_load_library(libraries, "librbd1", names, slots, functionCount, load_error, sizeof load_error);
}

const char *ferry_rbd_load_error(void) {
    pthread_once(&once, load);
    return load_error[0] ? load_error : NULL;
}

// Every function but these two is only reached with a cluster handle, so after rados_create
// succeeded.
#define FORWARD(lib, ret, name, params, args) \
    ret name params { return ((ret (*) params) slots[index_##name]) args; }
FERRY_RBD_FUNCTIONS(FORWARD)
#undef FORWARD

int rados_create(rados_t *cluster, const char *id) {
    if (ferry_rbd_load_error()) return -ENOSYS;
    return ((int (*)(rados_t *, const char *))slots[index_rados_create])(cluster, id);
}

int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c) {
    if (ferry_rbd_load_error()) return -ENOSYS;
    return ((int (*)(void *, rbd_callback_t, rbd_completion_t *))slots[index_rbd_aio_create_completion])(cb_arg, complete_cb, c);
}
