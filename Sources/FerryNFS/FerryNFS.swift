// The NFS endpoint (libnfs) goes here.
