-- The Supabase REST mode's readiness probe: which migrations are applied.
--
-- The direct mode reads supabase_migrations.schema_migrations itself; through the REST API (PostgREST)
-- only the exposed schema (public) is reachable, and service_role has no grant on the CLI's own schema.
-- So this one function reads it as its owner (security definer, empty search_path, every name
-- qualified), and only service_role may call it: it answers version strings, nothing else.
create function public.collection_applied_migrations()
returns text[]
language sql stable
security definer
set search_path = ''
as $$
  select coalesce(array_agg(m.version order by m.version), '{}')
    from supabase_migrations.schema_migrations m
$$;

revoke execute on function public.collection_applied_migrations() from public, anon, authenticated;
grant execute on function public.collection_applied_migrations() to service_role;
