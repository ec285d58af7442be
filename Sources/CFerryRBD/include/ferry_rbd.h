// librbd and librados, loaded on first use.
//
// librbd brings most of Ceph's client (libceph-common, boost, and their friends): linked
// normally, every start of ferry would load it, and ferry would not start at all on a
// machine without Ceph's client libraries. This target defines the functions Ferry calls,
// under their own names and with librbd.h's prototypes; the first call dlopens librbd.so.1
// and librados.so.2 and each then forwards to the real function. Add a function here before
// calling it from Swift (the link fails otherwise, since nothing links librbd itself).
#pragma once

/// Why librbd could not be loaded, or NULL if it is loaded (loading it if need be).
const char *ferry_rbd_load_error(void);
