// libnfs.h uses struct timeval without including <sys/time.h> itself.
#include <sys/time.h>
#include <nfsc/libnfs.h>
