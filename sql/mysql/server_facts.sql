-- what a server is: version, identity and binary logging (one row)
SELECT VERSION(), @@server_id, @@hostname, @@log_bin, IFNULL(@@log_bin_basename, '')
