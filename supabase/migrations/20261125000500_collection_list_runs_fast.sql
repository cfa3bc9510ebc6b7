-- Runs listing that stays fast with many runs (measured with 1,000,000 runs, 100,000 in one org:
-- benchmarks/README.md). Builds on 20261125000210 (the `p_status` filter), same signature.
--
-- 1. `total`: counting 100,000 rows on every page took ~25 ms. Now, as Supabase Studio does, the
--    planner's estimate is used when it is above 10,000 (`total_estimated: true`); at or below it the
--    rows are counted exactly (index only, at most 10,001 of them). A count that passes 10,000
--    although the estimate did not (stale statistics) is reported as an estimate too.
-- 2. `offset` pages: the offset is walked over the index alone (ids only, no table rows), and only the
--    page's rows are read: offset 90,000 fell from ~17 ms to a few.
-- 3. Keyset pages: collection_list_runs_after(org, limit, created_at, id, status) returns the runs
--    after a given one (the API's opaque `cursor`), at the cost of a first page however deep.
-- 4. An index on (org_id, status, created_at desc, id desc) serves the status filter: pages and
--    counts of one status no longer read the org's other runs.

create index collection_runs_org_status_created_idx
  on public.collection_runs (org_id, status, created_at desc, id desc);

-- Rows of an org (optionally of one status): exact up to 10,000, else the planner's estimate.
-- Volatile only because EXPLAIN is refused inside stable functions; it changes nothing.
create function public.collection_count_runs(p_org_id uuid, p_status text default null)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  exact_up_to constant bigint := 10000;
  plan jsonb;
  estimate bigint;
  counted bigint;
begin
  if p_status is null then
    execute format('explain (format json) select 1 from public.collection_runs where org_id = %L',
                   p_org_id) into plan;
  else
    execute format('explain (format json) select 1 from public.collection_runs '
                   'where org_id = %L and status = %L', p_org_id, p_status) into plan;
  end if;
  estimate := (plan -> 0 -> 'Plan' ->> 'Plan Rows')::bigint;
  if estimate > exact_up_to then
    return jsonb_build_object('total', estimate, 'total_estimated', true);
  end if;

  if p_status is null then
    select count(*) into counted
      from (select 1 from public.collection_runs where org_id = p_org_id limit exact_up_to + 1) capped;
  else
    select count(*) into counted
      from (select 1 from public.collection_runs where org_id = p_org_id and status = p_status
             limit exact_up_to + 1) capped;
  end if;
  if counted > exact_up_to then
    return jsonb_build_object('total', greatest(estimate, counted), 'total_estimated', true);
  end if;
  return jsonb_build_object('total', counted, 'total_estimated', false);
end
$$;

-- A page by offset, newest first. Same signature and result as before, plus `total_estimated`.
create or replace function public.collection_list_runs(
  p_org_id uuid,
  p_limit integer,
  p_offset integer,
  p_status text default null
)
returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  page jsonb;
begin
  -- The offset is skipped in the index (ids only); only the page's own rows are read.
  if p_status is null then
    select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
      from (select id from public.collection_runs
             where org_id = p_org_id
             order by created_at desc, id desc
             limit p_limit offset p_offset) k
      join public.collection_runs r on r.id = k.id;
  else
    select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
      from (select id from public.collection_runs
             where org_id = p_org_id and status = p_status
             order by created_at desc, id desc
             limit p_limit offset p_offset) k
      join public.collection_runs r on r.id = k.id;
  end if;
  return public.collection_count_runs(p_org_id, p_status) || jsonb_build_object('runs', coalesce(page, '[]'));
end
$$;

-- A page of the runs after (older than) the run with this created_at and id, newest first: the
-- keyset behind the API's `cursor`. As fast at any depth as the first page.
create function public.collection_list_runs_after(
  p_org_id uuid,
  p_limit integer,
  p_after_created_at timestamptz,
  p_after_id uuid,
  p_status text default null
)
returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  page jsonb;
begin
  if p_status is null then
    select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
      from (select * from public.collection_runs
             where org_id = p_org_id and (created_at, id) < (p_after_created_at, p_after_id)
             order by created_at desc, id desc
             limit p_limit) r;
  else
    select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
      from (select * from public.collection_runs
             where org_id = p_org_id and status = p_status
               and (created_at, id) < (p_after_created_at, p_after_id)
             order by created_at desc, id desc
             limit p_limit) r;
  end if;
  return public.collection_count_runs(p_org_id, p_status) || jsonb_build_object('runs', coalesce(page, '[]'));
end
$$;

revoke execute on function
  public.collection_count_runs(uuid, text),
  public.collection_list_runs_after(uuid, integer, timestamptz, uuid, text)
from public, anon, authenticated;
grant execute on function
  public.collection_count_runs(uuid, text),
  public.collection_list_runs_after(uuid, integer, timestamptz, uuid, text)
to service_role;
