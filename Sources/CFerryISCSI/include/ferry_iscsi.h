// libiscsi, loaded on first use.
//
// libiscsi brings the RDMA stack (libibverbs, librdmacm, libnl) with it: linked normally,
// every start of ferry read them from a cold disk, even for a copy that never speaks iSCSI.
// This target defines the libiscsi functions Ferry calls, under their own names and with
// libiscsi's prototypes; the first call to iscsi_create_context dlopens libiscsi.so.7 and
// each then forwards to the real function. Add a function here before calling it from Swift
// (the link fails otherwise, since nothing links libiscsi itself).
#pragma once

/// Why libiscsi.so.7 could not be loaded, or NULL if it is loaded (loading it if need be).
const char *ferry_iscsi_load_error(void);
