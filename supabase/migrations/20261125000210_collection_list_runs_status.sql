-- Runs listing filtered by status (the admin console's status filter), done in the database so that
-- `total` counts the runs matching the filter and pages stay full.
-- Replaces collection_list_runs(uuid, integer, integer): a second overload would make three-argument
-- calls ambiguous, so the old signature is dropped and the new one takes `p_status default null`
-- (null: every status, as before).

drop function public.collection_list_runs(uuid, integer, integer);

create function public.collection_list_runs(
  p_org_id uuid,
  p_limit integer,
  p_offset integer,
  p_status text default null
)
returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object(
    'total', (select count(*) from public.collection_runs
               where org_id = p_org_id and (p_status is null or status = p_status)),
    'runs', coalesce((
      select jsonb_agg(to_jsonb(page) order by page.created_at desc, page.id desc)
        from (select * from public.collection_runs
               where org_id = p_org_id and (p_status is null or status = p_status)
               order by created_at desc, id desc
               limit p_limit offset p_offset) page
    ), '[]'::jsonb)
  )
$$;

revoke execute on function public.collection_list_runs(uuid, integer, integer, text)
  from public, anon, authenticated;
grant execute on function public.collection_list_runs(uuid, integer, integer, text) to service_role;
