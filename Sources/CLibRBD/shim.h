#include <rbd/librbd.h>
