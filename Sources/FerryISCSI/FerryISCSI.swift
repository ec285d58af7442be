// The iSCSI endpoint (libiscsi) goes here.
