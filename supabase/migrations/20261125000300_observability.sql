-- Runs by status across all organisations, for the service's /metrics (collection_runs gauge).
create function public.collection_run_status_counts()
returns table (status text, runs bigint)
language sql stable
set search_path = ''
as $$
  select status, count(*) from public.collection_runs group by status
$$;

revoke execute on function public.collection_run_status_counts() from public, anon, authenticated;
grant execute on function public.collection_run_status_counts() to service_role;
