-- serve: WAL archiving
SELECT archived_count, last_archived_wal, last_archived_time, failed_count, last_failed_wal, last_failed_time
  FROM pg_stat_archiver
