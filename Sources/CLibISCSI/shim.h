// scsi-lowlevel.h needs the types iscsi.h declares first.
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>
