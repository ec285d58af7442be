// See include/ferry_iscsi.h.
#include <pthread.h>
#include <stdint.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#include "ferry_iscsi.h"
#include "ferry_load.h"

// Reached only with a context, so after iscsi_create_context succeeded.
// X(return type, name, (parameters), (arguments))
#define FERRY_ISCSI_FUNCTIONS(X) \
    X(int, iscsi_destroy_context, (struct iscsi_context *iscsi), (iscsi)) \
    X(void, iscsi_destroy_url, (struct iscsi_url *url), (url)) \
    X(int, iscsi_full_connect_async, (struct iscsi_context *iscsi, const char *portal, int lun, iscsi_command_cb cb, \
        void *private_data), (iscsi, portal, lun, cb, private_data)) \
    X(const char *, iscsi_get_error, (struct iscsi_context *iscsi), (iscsi)) \
    X(int, iscsi_get_fd, (struct iscsi_context *iscsi), (iscsi)) \
    X(struct scsi_task *, iscsi_get_lba_status_task, (struct iscsi_context *iscsi, int lun, uint64_t starting_lba, \
        uint32_t alloc_len, iscsi_command_cb cb, void *private_data), (iscsi, lun, starting_lba, alloc_len, cb, private_data)) \
    X(struct scsi_task *, iscsi_inquiry_task, (struct iscsi_context *iscsi, int lun, int evpd, int page_code, int maxsize, \
        iscsi_command_cb cb, void *private_data), (iscsi, lun, evpd, page_code, maxsize, cb, private_data)) \
    X(int, iscsi_logout_async, (struct iscsi_context *iscsi, iscsi_command_cb cb, void *private_data), (iscsi, cb, private_data)) \
    X(struct iscsi_url *, iscsi_parse_full_url, (struct iscsi_context *iscsi, const char *url), (iscsi, url)) \
    X(struct scsi_task *, iscsi_read16_iov_task, (struct iscsi_context *iscsi, int lun, uint64_t lba, uint32_t datalen, \
        int blocksize, int rdprotect, int dpo, int fua, int fua_nv, int group_number, iscsi_command_cb cb, void *private_data, \
        struct scsi_iovec *iov, int niov), \
        (iscsi, lun, lba, datalen, blocksize, rdprotect, dpo, fua, fua_nv, group_number, cb, private_data, iov, niov)) \
    X(struct scsi_task *, iscsi_readcapacity16_task, (struct iscsi_context *iscsi, int lun, iscsi_command_cb cb, \
        void *private_data), (iscsi, lun, cb, private_data)) \
    X(int, iscsi_service, (struct iscsi_context *iscsi, int revents), (iscsi, revents)) \
    X(int, iscsi_set_header_digest, (struct iscsi_context *iscsi, enum iscsi_header_digest header_digest), \
        (iscsi, header_digest)) \
    X(int, iscsi_set_initiator_username_pwd, (struct iscsi_context *iscsi, const char *user, const char *passwd), \
        (iscsi, user, passwd)) \
    X(void, iscsi_set_noautoreconnect, (struct iscsi_context *iscsi, int state), (iscsi, state)) \
    X(void, iscsi_set_reconnect_max_retries, (struct iscsi_context *iscsi, int count), (iscsi, count)) \
    X(int, iscsi_set_session_type, (struct iscsi_context *iscsi, enum iscsi_session_type session_type), \
        (iscsi, session_type)) \
    X(int, iscsi_set_targetname, (struct iscsi_context *iscsi, const char *targetname), (iscsi, targetname)) \
    X(struct scsi_task *, iscsi_synchronizecache16_task, (struct iscsi_context *iscsi, int lun, uint64_t lba, \
        uint32_t num_blocks, int syncnv, int immed, iscsi_command_cb cb, void *private_data), \
        (iscsi, lun, lba, num_blocks, syncnv, immed, cb, private_data)) \
    X(struct scsi_task *, iscsi_unmap_task, (struct iscsi_context *iscsi, int lun, int anchor, int group, \
        struct unmap_list *list, int list_len, iscsi_command_cb cb, void *private_data), \
        (iscsi, lun, anchor, group, list, list_len, cb, private_data)) \
    X(int, iscsi_which_events, (struct iscsi_context *iscsi), (iscsi)) \
    X(struct scsi_task *, iscsi_write16_iov_task, (struct iscsi_context *iscsi, int lun, uint64_t lba, unsigned char *data, \
        uint32_t datalen, int blocksize, int wrprotect, int dpo, int fua, int fua_nv, int group_number, iscsi_command_cb cb, \
        void *private_data, struct scsi_iovec *iov, int niov), \
        (iscsi, lun, lba, data, datalen, blocksize, wrprotect, dpo, fua, fua_nv, group_number, cb, private_data, iov, niov)) \
    X(struct scsi_task *, iscsi_writesame16_task, (struct iscsi_context *iscsi, int lun, uint64_t lba, unsigned char *data, \
        uint32_t datalen, uint32_t num_blocks, int anchor, int unmap, int wrprotect, int group, iscsi_command_cb cb, \
        void *private_data), (iscsi, lun, lba, data, datalen, num_blocks, anchor, unmap, wrprotect, group, cb, private_data)) \
    X(void *, scsi_datain_unmarshall, (struct scsi_task *task), (task)) \
    X(void, scsi_free_scsi_task, (struct scsi_task *task), (task)) \
    X(const char *, scsi_sense_ascq_str, (int ascq), (ascq)) \
    X(const char *, scsi_sense_key_str, (int key), (key))

enum {
    FERRY_ISCSI_FUNCTIONS(FERRY_INDEX)
    index_iscsi_create_context,
    functionCount
};

static const char *const names[functionCount] = {
    FERRY_ISCSI_FUNCTIONS(FERRY_NAME)
    "iscsi_create_context",
};

FERRY_LOADER(ferry_iscsi_load_error, "libiscsi7", "libiscsi.so.7")
FERRY_ISCSI_FUNCTIONS(FERRY_FORWARD)

struct iscsi_context *iscsi_create_context(const char *initiator_name) {
    if (ferry_iscsi_load_error()) return NULL;
    return FERRY_CALL(struct iscsi_context *, iscsi_create_context, (const char *))(initiator_name);
}
