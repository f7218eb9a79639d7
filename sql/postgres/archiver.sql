-- backup: is archiving failing right now (the last failure is newer than the last success)
SELECT failed_count, last_failed_wal, last_failed_time > coalesce(last_archived_time, '-infinity')
  FROM pg_stat_archiver
