// See include/ferry_crypto.h.
#include <pthread.h>
#include <openssl/evp.h>

#include "ferry_crypto.h"
#include "ferry_load.h"

// Reached only with a digest or a context, so after one of the entries below succeeded.
// X(return type, name, (parameters), (arguments))
#define FERRY_CRYPTO_FUNCTIONS(X) \
    X(void, EVP_MD_free, (EVP_MD *md), (md)) \
    X(void, EVP_MD_CTX_free, (EVP_MD_CTX *ctx), (ctx)) \
    X(int, EVP_MD_get_size, (const EVP_MD *md), (md)) \
    X(int, EVP_DigestInit_ex, (EVP_MD_CTX *ctx, const EVP_MD *type, ENGINE *impl), (ctx, type, impl)) \
    X(int, EVP_DigestUpdate, (EVP_MD_CTX *ctx, const void *d, size_t cnt), (ctx, d, cnt)) \
    X(int, EVP_DigestFinal_ex, (EVP_MD_CTX *ctx, unsigned char *md, unsigned int *s), (ctx, md, s)) \
    X(int, EVP_Digest, (const void *data, size_t count, unsigned char *md, unsigned int *size, const EVP_MD *type, \
        ENGINE *impl), (data, count, md, size, type, impl))

// The ways in: each loads libcrypto first and answers NULL if it cannot be loaded.
#define FERRY_CRYPTO_ENTRIES(X) \
    X(EVP_MD *, EVP_MD_fetch, (OSSL_LIB_CTX *ctx, const char *algorithm, const char *properties), \
        (ctx, algorithm, properties)) \
    X(EVP_MD_CTX *, EVP_MD_CTX_new, (void), ()) \
    X(const EVP_MD *, EVP_sha1, (void), ()) \
    X(const EVP_MD *, EVP_sha256, (void), ()) \
    X(const EVP_MD *, EVP_sha512, (void), ())

enum {
    FERRY_CRYPTO_FUNCTIONS(FERRY_INDEX)
    FERRY_CRYPTO_ENTRIES(FERRY_INDEX)
    functionCount
};

static const char *const names[functionCount] = {
    FERRY_CRYPTO_FUNCTIONS(FERRY_NAME)
    FERRY_CRYPTO_ENTRIES(FERRY_NAME)
};

FERRY_LOADER(ferry_crypto_load_error, "libssl3", "libcrypto.so.3")
FERRY_CRYPTO_FUNCTIONS(FERRY_FORWARD)

#define ENTRY(ret, name, params, args) \
    ret name params { return ferry_crypto_load_error() ? NULL : FERRY_CALL(ret, name, params) args; }
FERRY_CRYPTO_ENTRIES(ENTRY)
#undef ENTRY
