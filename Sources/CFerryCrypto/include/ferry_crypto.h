// OpenSSL's libcrypto, loaded on first use.
//
// Only checksums and an OVA's manifest need a digest, but linked normally libcrypto (4.5 MiB)
// was read at every start of ferry from a cold disk: 12 ms of a cold start. This target
// defines the libcrypto functions Ferry calls, under their own names and with
// openssl/evp.h's prototypes; the first call to one that starts a digest (fetching one, or
// making a context) dlopens libcrypto.so.3 and each then forwards to the real function. Add
// a function here before calling it from Swift (the link fails otherwise, since nothing links
// libcrypto itself).
#pragma once

/// Why libcrypto.so.3 could not be loaded, or NULL if it is loaded (loading it if need be).
const char *ferry_crypto_load_error(void);
