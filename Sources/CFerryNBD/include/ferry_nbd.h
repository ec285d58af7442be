// libnbd, loaded on first use.
//
// libnbd brings GnuTLS, libxml2 and ICU with it: linked normally, every start of ferry
// loaded them (25 MiB read from a cold disk, about 30 ms), even for a local copy that never
// speaks NBD. This target defines the libnbd functions Ferry calls, under their own names
// and with libnbd.h's prototypes; the first call dlopens libnbd.so.0 and each then forwards
// to the real function. Add a function here before calling it from Swift (the link fails
// otherwise, since nothing links libnbd itself).
#pragma once

/// Why libnbd.so.0 could not be loaded, or NULL if it is loaded (loading it if need be).
const char *ferry_nbd_load_error(void);
