// The NBD endpoint (libnbd) goes here.
