-- The collection service's schema: one baseline, the whole schema as it is now.
--
-- Until the first release this file is edited in place (nothing is deployed yet; a local database is
-- rebuilt with `make clean-data`). After it, migrations only add: a new file per change, never an edit
-- here (README, "Changing the schema").
--
-- Applies unchanged to a hosted Supabase project (`supabase db push`) and to the embedded Postgres
-- (after supabase/local/bootstrap.sql has created what Supabase provides: roles, auth.users, auth.uid()).
-- Tested on Postgres 15 and 18 (Supabase runs 17).
--
-- Every write goes through a function below: one call is one round trip and one atomic step. The service
-- declares each function it calls once, with its named arguments and result (apps/api/src/app/operations.py),
-- and a test holds that table to pg_proc.
--
-- Errors raised by the functions use SQLSTATE class 'CR' so every client (asyncpg, PostgREST) can map
-- them to the same domain error:
--   CR001 budget exceeded        CR002 concurrent run limit     CR003 run not found
--   CR004 transition not allowed CR005 lease lost (the caller no longer holds the run)
--
-- Money is integer cents (bigint). actual_cost_cents is what the provider has (or may have) charged:
-- known charges plus uncertain ones (reservations a dead process left behind, moved into
-- actual_cost_cents and uncertain_cost_cents when its runs are taken over); reserved_cents covers calls
-- in flight; actual_cost_cents + reserved_cents never passes budget_cap_cents (a CHECK, so no path can).

-- ---------------------------------------------------------------------------------------------------
-- Organisations, memberships, permissions
-- ---------------------------------------------------------------------------------------------------
create table public.organizations (
  id uuid primary key default gen_random_uuid(),
  slug text not null unique check (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
  name text not null check (char_length(name) between 1 and 200),
  created_at timestamptz not null default now()
);

create table public.roles (
  key text primary key check (key ~ '^[a-z][a-z0-9_]{0,31}$'),
  description text not null default ''
);

create table public.role_permissions (
  role text not null references public.roles (key) on delete cascade,
  permission_key text not null check (permission_key ~ '^[a-z][a-z0-9_.]{0,63}$'),
  primary key (role, permission_key)
);

create table public.memberships (
  user_id uuid not null references auth.users (id) on delete cascade,
  org_id uuid not null references public.organizations (id) on delete cascade,
  role text not null references public.roles (key),
  created_at timestamptz not null default now(),
  primary key (user_id, org_id)
);
create index memberships_org_id_idx on public.memberships (org_id);

insert into public.roles (key, description) values
  ('admin', 'Runs collections and manages the organisation''s collection settings'),
  ('member', 'Reads the organisation''s data through Supabase; no API permissions');
insert into public.role_permissions (role, permission_key) values ('admin', 'admin.automation');

-- ---------------------------------------------------------------------------------------------------
-- Settings and runs
-- ---------------------------------------------------------------------------------------------------
create table public.collection_settings (
  org_id uuid primary key references public.organizations (id) on delete cascade,
  budget_cap_cents bigint not null default 2500
    check (budget_cap_cents between 0 and 1000000000000),
  soft_warning_percent integer not null default 80
    check (soft_warning_percent between 0 and 100),
  max_concurrent_runs integer not null default 3
    check (max_concurrent_runs between 1 and 1000),
  updated_at timestamptz not null default now()
);

-- A category id is 1..64 characters with no control characters; a run has 1..100 distinct ones.
create function public.collection_category_ids_valid(ids text[]) returns boolean
language sql immutable parallel safe
set search_path = ''
as $$
  select cardinality(ids) between 1 and 100
     and array_position(ids, null) is null
     and (select bool_and(char_length(c) between 1 and 64 and c !~ '[[:cntrl:]]') from unnest(ids) c)
     and (select count(distinct c) from unnest(ids) c) = cardinality(ids)
$$;

create table public.collection_runs (
  id uuid primary key default gen_random_uuid(),
  org_id uuid not null references public.organizations (id) on delete cascade,
  name text not null check (char_length(name) between 1 and 200),
  status text not null default 'pending'
    check (status in ('pending', 'running', 'paused', 'completed', 'failed', 'cancelled')),
  estimated_cost_cents bigint not null check (estimated_cost_cents >= 0),
  actual_cost_cents bigint not null default 0 check (actual_cost_cents >= 0),
  budget_cap_cents bigint not null check (budget_cap_cents >= 0),
  reserved_cents bigint not null default 0 check (reserved_cents >= 0),
  uncertain_cost_cents bigint not null default 0 check (uncertain_cost_cents >= 0),
  total_items integer not null default 0 check (total_items >= 0),
  processed_items integer not null default 0 check (processed_items >= 0),
  failed_items integer not null default 0 check (failed_items between 0 and processed_items),
  category_ids text[] not null check (public.collection_category_ids_valid(category_ids)),
  provider text not null default 'sandbox' check (provider in ('sandbox', 'oxylabs')),
  -- Where the executor is: the last category or item it recorded (for start-up recovery's log).
  checkpoint jsonb,
  status_message text,
  status_reason text,
  lease_owner text,
  lease_token uuid,
  lease_expires_at timestamptz,
  started_at timestamptz,
  completed_at timestamptz,
  paused_at timestamptz,
  created_by uuid references auth.users (id) on delete set null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  check (completed_at is null or status in ('completed', 'failed', 'cancelled')),
  check (paused_at is null or status in ('paused', 'cancelled')),
  constraint collection_runs_within_cap check (actual_cost_cents + reserved_cents <= budget_cap_cents),
  constraint collection_runs_uncertain_in_actual check (uncertain_cost_cents <= actual_cost_cents)
);
-- Listing: newest first within an org (id breaks ties so pages are stable), optionally by status.
create index collection_runs_org_created_idx on public.collection_runs (org_id, created_at desc, id desc);
create index collection_runs_org_status_created_idx
  on public.collection_runs (org_id, status, created_at desc, id desc);
-- Concurrency limit: counting an org's active runs touches only active rows.
create index collection_runs_org_active_idx on public.collection_runs (org_id)
  where status in ('pending', 'running', 'paused');
-- Start-up recovery: interrupted runs across all orgs.
create index collection_runs_interrupted_idx on public.collection_runs (created_at)
  where status in ('running', 'paused');
-- Claiming: running runs whose lease is free, expired or left by an earlier process of the same worker.
create index collection_runs_claimable_idx on public.collection_runs (started_at, id)
  where status = 'running';
create index collection_runs_lease_token_idx on public.collection_runs (lease_token)
  where lease_token is not null;

-- The one table of allowed transitions. `action` is what a caller asks for; the API exposes
-- start/pause/resume/cancel, the executor uses the rest.
create table public.collection_run_transitions (
  action text not null,
  from_status text not null,
  to_status text not null,
  primary key (action, from_status)
);
insert into public.collection_run_transitions (action, from_status, to_status) values
  ('start', 'pending', 'running'),
  ('pause', 'running', 'paused'),
  ('resume', 'paused', 'running'),
  ('cancel', 'pending', 'cancelled'),
  ('cancel', 'running', 'cancelled'),
  ('cancel', 'paused', 'cancelled'),
  ('complete', 'running', 'completed'),
  ('fail', 'running', 'failed'),
  ('fail', 'paused', 'failed');

-- ---------------------------------------------------------------------------------------------------
-- Event log: every status change is recorded by the database itself, whoever makes it.
-- The actor and reason come from transaction-local settings the functions set.
-- ---------------------------------------------------------------------------------------------------
create table public.collection_run_events (
  id bigint generated always as identity primary key,
  run_id uuid not null references public.collection_runs (id) on delete cascade,
  org_id uuid not null references public.organizations (id) on delete cascade,
  from_status text,
  to_status text not null,
  actor uuid,
  reason text,
  created_at timestamptz not null default clock_timestamp()
);
create index collection_run_events_run_idx on public.collection_run_events (run_id, id);

create function public.collection_runs_record_event() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if tg_op = 'INSERT' or new.status is distinct from old.status then
    insert into public.collection_run_events (run_id, org_id, from_status, to_status, actor, reason)
    values (
      new.id, new.org_id,
      case when tg_op = 'UPDATE' then old.status end,
      new.status,
      nullif(current_setting('collection.actor', true), '')::uuid,
      nullif(current_setting('collection.reason', true), '')
    );
  end if;
  return new;
end
$$;

create function public.collection_runs_touch() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end
$$;

create trigger collection_runs_event_after
  after insert or update of status on public.collection_runs
  for each row execute function public.collection_runs_record_event();

create trigger collection_runs_touch_before
  before update on public.collection_runs
  for each row execute function public.collection_runs_touch();

create function public.collection_run_events_append_only() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  -- Deleting a run (or an organisation) cascades here from inside a trigger: allowed.
  if tg_op = 'DELETE' and pg_trigger_depth() > 1 then
    return old;
  end if;
  raise exception 'collection_run_events is append-only' using errcode = 'insufficient_privilege';
end
$$;

create trigger collection_run_events_append_only
  before update or delete on public.collection_run_events
  for each row execute function public.collection_run_events_append_only();

-- ---------------------------------------------------------------------------------------------------
-- What the executor walks: a run's categories, their products (items), the sellers found, and what
-- past runs observed per category (the estimate learns from it).
-- ---------------------------------------------------------------------------------------------------
create table public.collection_run_categories (
  run_id uuid not null references public.collection_runs (id) on delete cascade,
  position integer not null check (position >= 1),
  category_id text not null,
  products integer check (products >= 0),
  discovery_cost_cents bigint not null default 0 check (discovery_cost_cents >= 0),
  error text,
  discovered_at timestamptz,
  primary key (run_id, position),
  unique (run_id, category_id)
);

create table public.collection_run_items (
  run_id uuid not null references public.collection_runs (id) on delete cascade,
  org_id uuid not null references public.organizations (id) on delete cascade,
  category_id text not null,
  asin text not null check (char_length(asin) between 1 and 32),
  position integer not null,
  status text not null default 'pending' check (status in ('pending', 'done', 'failed')),
  attempts integer not null default 0 check (attempts >= 0),
  cost_cents bigint not null default 0 check (cost_cents >= 0),
  result jsonb,
  last_error text,
  worked_by text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (run_id, category_id, asin)
);
create index collection_run_items_pending_idx on public.collection_run_items (run_id, category_id, position)
  where status = 'pending';
create index collection_run_items_listing_idx
  on public.collection_run_items (run_id, status, category_id, position);

create table public.collection_sellers (
  org_id uuid not null references public.organizations (id) on delete cascade,
  seller text not null check (char_length(seller) between 1 and 200),
  listings_seen bigint not null default 0 check (listings_seen >= 0),
  products_seen bigint not null default 0 check (products_seen >= 0),
  lowest_price_cents bigint check (lowest_price_cents >= 0),
  first_run_id uuid references public.collection_runs (id) on delete set null,
  last_run_id uuid references public.collection_runs (id) on delete set null,
  first_seen_at timestamptz not null default now(),
  last_seen_at timestamptz not null default now(),
  primary key (org_id, seller)
);
create index collection_sellers_listing_idx on public.collection_sellers (org_id, listings_seen desc, seller);

create table public.collection_category_stats (
  org_id uuid not null references public.organizations (id) on delete cascade,
  category_id text not null,
  products_last_seen integer not null check (products_last_seen >= 0),
  discovery_cost_cents bigint not null default 0 check (discovery_cost_cents >= 0),
  items_processed bigint not null default 0 check (items_processed >= 0),
  item_cost_cents bigint not null default 0 check (item_cost_cents >= 0),
  updated_at timestamptz not null default now(),
  primary key (org_id, category_id)
);

-- ---------------------------------------------------------------------------------------------------
-- Settings
-- ---------------------------------------------------------------------------------------------------

-- An org's settings, created with the table defaults on first read.
create function public.collection_get_settings(p_org_id uuid)
returns public.collection_settings
language plpgsql
set search_path = ''
as $$
declare
  s public.collection_settings;
begin
  select * into s from public.collection_settings where org_id = p_org_id;
  if not found then
    insert into public.collection_settings (org_id) values (p_org_id) on conflict (org_id) do nothing;
    select * into s from public.collection_settings where org_id = p_org_id;
  end if;
  return s;
end
$$;

-- Partial update: a null argument leaves that field as it is.
create function public.collection_update_settings(
  p_org_id uuid,
  p_budget_cap_cents bigint default null,
  p_soft_warning_percent integer default null,
  p_max_concurrent_runs integer default null
)
returns public.collection_settings
language plpgsql
set search_path = ''
as $$
declare
  s public.collection_settings;
begin
  insert into public.collection_settings (org_id) values (p_org_id) on conflict (org_id) do nothing;
  update public.collection_settings
     set budget_cap_cents = coalesce(p_budget_cap_cents, budget_cap_cents),
         soft_warning_percent = coalesce(p_soft_warning_percent, soft_warning_percent),
         max_concurrent_runs = coalesce(p_max_concurrent_runs, max_concurrent_runs),
         updated_at = now()
   where org_id = p_org_id
  returning * into s;
  return s;
end
$$;

-- Settings and the history of the requested categories, for an estimate, in one round trip.
create function public.collection_estimate_inputs(p_org_id uuid, p_category_ids text[])
returns jsonb
language sql
set search_path = ''
as $$
  select jsonb_build_object(
    'settings', to_jsonb(public.collection_get_settings(p_org_id)),
    'history', coalesce((
      select jsonb_object_agg(st.category_id, jsonb_build_object(
               'products', st.products_last_seen,
               'discovery_cost_cents', st.discovery_cost_cents,
               'items_processed', st.items_processed,
               'item_cost_cents', st.item_cost_cents))
        from public.collection_category_stats st
       where st.org_id = p_org_id and st.category_id = any (p_category_ids)
         and st.items_processed > 0
    ), '{}'::jsonb)
  )
$$;

-- ---------------------------------------------------------------------------------------------------
-- Runs: create, read, list, transitions
-- ---------------------------------------------------------------------------------------------------

-- Budget cap + concurrency limit + insert, under the org's settings row lock, so two creates in
-- the same org are serialised and neither can slip past a limit the other is about to reach.
create function public.collection_create_run(
  p_org_id uuid,
  p_created_by uuid,
  p_name text,
  p_category_ids text[],
  p_estimated_cost_cents bigint,
  p_total_items integer,
  p_provider text
)
returns public.collection_runs
language plpgsql
set search_path = ''
as $$
declare
  s public.collection_settings;
  active integer;
  r public.collection_runs;
begin
  insert into public.collection_settings (org_id) values (p_org_id) on conflict (org_id) do nothing;
  select * into s from public.collection_settings where org_id = p_org_id for update;

  if p_estimated_cost_cents > s.budget_cap_cents then
    raise exception 'estimated cost exceeds budget cap'
      using errcode = 'CR001',
            detail = json_build_object('estimated_cost_cents', p_estimated_cost_cents,
                                       'budget_cap_cents', s.budget_cap_cents)::text;
  end if;

  select count(*) into active
    from public.collection_runs
   where org_id = p_org_id and status in ('pending', 'running', 'paused');
  if active >= s.max_concurrent_runs then
    raise exception 'concurrent run limit reached'
      using errcode = 'CR002',
            detail = json_build_object('active_runs', active,
                                       'max_concurrent_runs', s.max_concurrent_runs)::text;
  end if;

  perform set_config('collection.actor', coalesce(p_created_by::text, ''), true);
  perform set_config('collection.reason', 'created', true);
  insert into public.collection_runs
    (org_id, name, category_ids, estimated_cost_cents, budget_cap_cents, total_items, created_by,
     provider)
  values
    (p_org_id, p_name, p_category_ids, p_estimated_cost_cents, s.budget_cap_cents, p_total_items,
     p_created_by, p_provider)
  returning * into r;

  insert into public.collection_run_categories (run_id, position, category_id)
  select r.id, o.n, o.c from unnest(p_category_ids) with ordinality as o(c, n);
  return r;
end
$$;

create function public.collection_get_run(p_org_id uuid, p_run_id uuid)
returns setof public.collection_runs
language sql stable
set search_path = ''
as $$
  select * from public.collection_runs where id = p_run_id and org_id = p_org_id
$$;

-- The total of a listing: `counted` rows were found with `limit 10,001`; up to 10,000 that is exact,
-- above it the planner's estimate is used (never below what was counted: statistics can lag behind
-- a fast-growing org), as Supabase Studio does. Volatile only because EXPLAIN is refused inside
-- stable functions.
create function public.collection_runs_total(p_org_id uuid, p_status text, p_counted bigint)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  plan jsonb;
begin
  if p_counted <= 10000 then
    return jsonb_build_object('total', p_counted, 'total_estimated', false);
  end if;
  if p_status is null then
    execute format('explain (format json) select 1 from public.collection_runs where org_id = %L',
                   p_org_id) into plan;
  else
    execute format('explain (format json) select 1 from public.collection_runs '
                   'where org_id = %L and status = %L', p_org_id, p_status) into plan;
  end if;
  return jsonb_build_object(
    'total', greatest((plan -> 0 -> 'Plan' ->> 'Plan Rows')::bigint, p_counted),
    'total_estimated', true
  );
end
$$;

-- A page of an org's runs, newest first (optionally of one status), with the total, in one round trip.
-- After a run (p_after_created_at, p_after_id: the API's opaque cursor) the page is a keyset, as fast
-- at any depth as the first page; otherwise it starts at p_offset. Offsets under 1,000 read the page's
-- rows straight away; deeper ones walk the index alone (ids only) and read just the page's rows. Each
-- case is its own statement so that each gets its own plan.
create function public.collection_list_runs(
  p_org_id uuid,
  p_limit integer,
  p_offset integer default 0,
  p_status text default null,
  p_after_created_at timestamptz default null,
  p_after_id uuid default null
)
returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  counted bigint;
  page jsonb;
begin
  if p_status is null then
    select count(*) into counted
      from (select 1 from public.collection_runs where org_id = p_org_id limit 10001) capped;
    if p_after_id is not null then
      select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
        from (select * from public.collection_runs
               where org_id = p_org_id and (created_at, id) < (p_after_created_at, p_after_id)
               order by created_at desc, id desc
               limit p_limit) r;
    elsif p_offset < 1000 then
      select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
        from (select * from public.collection_runs
               where org_id = p_org_id
               order by created_at desc, id desc
               limit p_limit offset p_offset) r;
    else
      select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
        from (select id from public.collection_runs
               where org_id = p_org_id
               order by created_at desc, id desc
               limit p_limit offset p_offset) k
        join public.collection_runs r on r.id = k.id;
    end if;
  else
    select count(*) into counted
      from (select 1 from public.collection_runs
             where org_id = p_org_id and status = p_status limit 10001) capped;
    if p_after_id is not null then
      select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
        from (select * from public.collection_runs
               where org_id = p_org_id and status = p_status
                 and (created_at, id) < (p_after_created_at, p_after_id)
               order by created_at desc, id desc
               limit p_limit) r;
    elsif p_offset < 1000 then
      select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
        from (select * from public.collection_runs
               where org_id = p_org_id and status = p_status
               order by created_at desc, id desc
               limit p_limit offset p_offset) r;
    else
      select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
        from (select id from public.collection_runs
               where org_id = p_org_id and status = p_status
               order by created_at desc, id desc
               limit p_limit offset p_offset) k
        join public.collection_runs r on r.id = k.id;
    end if;
  end if;
  return (case when counted <= 10000
               then jsonb_build_object('total', counted, 'total_estimated', false)
               else public.collection_runs_total(p_org_id, p_status, counted) end)
         || jsonb_build_object('runs', coalesce(page, '[]'));
end
$$;

-- A transition: the run row locked first, then one UPDATE joined to the transitions table decides the
-- new status from the status the run has now, so a transition queued behind another is judged on the
-- status the first one left. Records why (status_reason), and refreshes the run's cap from the org's
-- settings when it (re)starts, so raising the cap and resuming lets a budget-paused run go on; the cap
-- never drops below what the run has already spent or reserved.
create function public.collection_transition_run(
  p_org_id uuid,
  p_run_id uuid,
  p_action text,
  p_actor uuid default null,
  p_reason text default null
)
returns public.collection_runs
language plpgsql
set search_path = ''
as $$
declare
  r public.collection_runs;
  current_status text;
begin
  select status into current_status
    from public.collection_runs where id = p_run_id and org_id = p_org_id
     for update;
  if not found then
    raise exception 'run not found' using errcode = 'CR003';
  end if;

  perform set_config('collection.actor', coalesce(p_actor::text, ''), true);
  perform set_config('collection.reason', coalesce(p_reason, p_action), true);

  update public.collection_runs run
     set status = t.to_status,
         started_at = case when t.to_status = 'running' then coalesce(run.started_at, now())
                           else run.started_at end,
         paused_at = case t.to_status when 'paused' then now()
                                      when 'cancelled' then run.paused_at
                                      else null end,
         completed_at = case when t.to_status in ('completed', 'failed', 'cancelled') then now()
                             else run.completed_at end,
         status_reason = case when t.to_status = 'running' then null else p_reason end,
         budget_cap_cents = case
           when t.to_status = 'running' then greatest(
             (select s.budget_cap_cents from public.collection_settings s where s.org_id = run.org_id),
             run.actual_cost_cents + run.reserved_cents)
           else run.budget_cap_cents end
    from public.collection_run_transitions t
   where run.id = p_run_id
     and t.action = p_action
     and t.from_status = current_status
  returning run.* into r;

  if found then
    return r;
  end if;
  raise exception 'cannot % a run that is %', p_action, current_status
    using errcode = 'CR004',
          detail = json_build_object('action', p_action, 'status', current_status)::text;
end
$$;

-- Interrupted runs across all orgs, oldest first, with their total count.
create function public.collection_incomplete_runs(p_limit integer)
returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object(
    'total', (select count(*) from public.collection_runs where status in ('running', 'paused')),
    'runs', coalesce((
      select jsonb_agg(jsonb_build_object(
               'id', r.id, 'org_id', r.org_id, 'name', r.name, 'status', r.status,
               'has_checkpoint', r.checkpoint is not null)
             order by r.created_at, r.id)
        from (select * from public.collection_runs
               where status in ('running', 'paused')
               order by created_at, id
               limit p_limit) r
    ), '[]'::jsonb)
  )
$$;

-- Runs by status across all organisations, for the service's /metrics (collection_runs gauge).
create function public.collection_run_status_counts()
returns table (status text, runs bigint)
language sql stable
set search_path = ''
as $$
  select status, count(*) from public.collection_runs group by status
$$;

-- ---------------------------------------------------------------------------------------------------
-- Items, sellers, events: reads
-- ---------------------------------------------------------------------------------------------------
create function public.collection_list_items(
  p_org_id uuid, p_run_id uuid, p_status text, p_limit integer, p_offset integer
)
returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object(
    'total', (select count(*) from public.collection_run_items
               where run_id = p_run_id and org_id = p_org_id and (p_status is null or status = p_status)),
    'items', coalesce((
      select jsonb_agg(to_jsonb(page) - 'org_id' order by page.category_position, page.position)
        from (select i.*, c.position as category_position
                from public.collection_run_items i
                join public.collection_run_categories c
                  on c.run_id = i.run_id and c.category_id = i.category_id
               where i.run_id = p_run_id and i.org_id = p_org_id
                 and (p_status is null or i.status = p_status)
               order by c.position, i.position
               limit p_limit offset p_offset) page
    ), '[]'::jsonb)
  )
$$;

create function public.collection_list_sellers(p_org_id uuid, p_limit integer, p_offset integer)
returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object(
    'total', (select count(*) from public.collection_sellers where org_id = p_org_id),
    'sellers', coalesce((
      select jsonb_agg(to_jsonb(page) - 'org_id' order by page.listings_seen desc, page.seller)
        from (select * from public.collection_sellers where org_id = p_org_id
               order by listings_seen desc, seller
               limit p_limit offset p_offset) page
    ), '[]'::jsonb)
  )
$$;

-- Up to p_limit events after a given id, oldest first, for the progress stream (which polls from the
-- last id it saw, so a page cut short only moves the rest to its next poll).
create function public.collection_run_events_since(
  p_org_id uuid, p_run_id uuid, p_after_id bigint, p_limit integer
)
returns setof public.collection_run_events
language sql stable
set search_path = ''
as $$
  select * from public.collection_run_events
   where run_id = p_run_id and org_id = p_org_id and id > p_after_id
   order by id
   limit p_limit
$$;

-- ---------------------------------------------------------------------------------------------------
-- The executor: leases. Every write the executor makes goes through a function fenced by the run's
-- lease token, so a process that lost its lease cannot write.
-- ---------------------------------------------------------------------------------------------------

-- Claim up to p_limit running runs whose lease is free, expired, or held by an earlier process of
-- this same worker (same owner, other token: it restarted, so take them back at once). Whatever the
-- previous holder had reserved may have been charged: it becomes an uncertain charge.
create function public.collection_claim_runs(p_owner text, p_token uuid, p_lease_s integer, p_limit integer)
returns setof public.collection_runs
language sql
set search_path = ''
as $$
  with candidates as (
    select id from public.collection_runs
     where status = 'running'
       and (lease_token is null
            or lease_expires_at < now()
            or (lease_owner = p_owner and lease_token <> p_token))
     order by started_at, id
     limit greatest(p_limit, 0)
     for update skip locked
  )
  update public.collection_runs r
     set lease_owner = p_owner,
         lease_token = p_token,
         lease_expires_at = now() + make_interval(secs => p_lease_s),
         actual_cost_cents = r.actual_cost_cents + r.reserved_cents,
         uncertain_cost_cents = r.uncertain_cost_cents + r.reserved_cents,
         reserved_cents = 0
    from candidates c
   where r.id = c.id
  returning r.*
$$;

-- Extend this process's leases; answer which runs it still holds and their status.
create function public.collection_heartbeat(p_token uuid, p_lease_s integer)
returns table (id uuid, status text)
language sql
set search_path = ''
as $$
  update public.collection_runs
     set lease_expires_at = now() + make_interval(secs => p_lease_s)
   where lease_token = p_token
  returning id, status
$$;

-- Give a run back. Anything still reserved was for calls whose outcome is unknown: uncertain charge.
create function public.collection_release_run(p_run_id uuid, p_token uuid)
returns void
language sql
set search_path = ''
as $$
  update public.collection_runs
     set lease_owner = null, lease_token = null, lease_expires_at = null,
         actual_cost_cents = actual_cost_cents + reserved_cents,
         uncertain_cost_cents = uncertain_cost_cents + reserved_cents,
         reserved_cents = 0
   where id = p_run_id and lease_token = p_token
$$;

-- The run row, locked, if the caller still holds its lease; CR005 otherwise.
create function public.collection_fenced_run(p_run_id uuid, p_token uuid)
returns public.collection_runs
language plpgsql
set search_path = ''
as $$
declare
  r public.collection_runs;
begin
  select * into r from public.collection_runs where id = p_run_id and lease_token = p_token for update;
  if not found then
    raise exception 'lease lost' using errcode = 'CR005';
  end if;
  return r;
end
$$;

create function public.collection_run_categories_of(p_run_id uuid)
returns setof public.collection_run_categories
language sql stable
set search_path = ''
as $$
  select * from public.collection_run_categories where run_id = p_run_id order by position
$$;

create function public.collection_pending_items(p_run_id uuid, p_category_id text)
returns setof public.collection_run_items
language sql stable
set search_path = ''
as $$
  select * from public.collection_run_items
   where run_id = p_run_id and category_id = p_category_id and status = 'pending'
   order by position
$$;

-- ---------------------------------------------------------------------------------------------------
-- The live budget
-- ---------------------------------------------------------------------------------------------------

-- Reserve the cost of the next call(s). 'ok', or why not: 'budget_exhausted' (the run is now paused
-- with that reason), another status ('paused', 'cancelled', ...), or 'lease_lost'.
create function public.collection_reserve(p_run_id uuid, p_token uuid, p_cents bigint)
returns text
language plpgsql
set search_path = ''
as $$
declare
  r public.collection_runs;
begin
  update public.collection_runs
     set reserved_cents = reserved_cents + p_cents
   where id = p_run_id and lease_token = p_token and status = 'running'
     and actual_cost_cents + reserved_cents + p_cents <= budget_cap_cents;
  if found then
    return 'ok';
  end if;

  select * into r from public.collection_runs where id = p_run_id for update;
  if not found or r.lease_token is distinct from p_token then
    return 'lease_lost';
  end if;
  if r.status <> 'running' then
    return r.status;
  end if;
  perform public.collection_transition_run(r.org_id, r.id, 'pause', null, 'budget_exhausted');
  update public.collection_runs
     set status_message = format('Paused: budget exhausted (%s of %s cents spent or in flight)',
                                 r.actual_cost_cents + r.reserved_cents, r.budget_cap_cents)
   where id = r.id;
  return 'budget_exhausted';
end
$$;

-- Hand back a reservation whose calls were not charged (e.g. the run failed before they were made).
create function public.collection_release_reservation(p_run_id uuid, p_token uuid, p_cents bigint)
returns void
language plpgsql
set search_path = ''
as $$
begin
  perform public.collection_fenced_run(p_run_id, p_token);
  update public.collection_runs set reserved_cents = reserved_cents - p_cents where id = p_run_id;
end
$$;

-- ---------------------------------------------------------------------------------------------------
-- Checkpoints: one atomic, fenced, idempotent statement per unit of work.
-- ---------------------------------------------------------------------------------------------------

-- A category's products were discovered (or discovery failed: p_error, no products). Recorded once:
-- a second record (a retry after a lost answer) only books the money it spent.
create function public.collection_record_discovery(
  p_run_id uuid,
  p_token uuid,
  p_position integer,
  p_products jsonb,          -- [{"asin": "...", "title": "..."}]
  p_cost_cents bigint,
  p_reserved_cents bigint,
  p_error text,
  p_estimated_per_category integer
)
returns public.collection_runs
language plpgsql
set search_path = ''
as $$
declare
  r public.collection_runs;
  cat public.collection_run_categories;
  found_products integer;
begin
  r := public.collection_fenced_run(p_run_id, p_token);
  select * into cat from public.collection_run_categories
   where run_id = p_run_id and position = p_position for update;
  if not found then
    raise exception 'no category at position % of this run', p_position using errcode = 'CR003';
  end if;
  if cat.discovered_at is not null then
    update public.collection_runs
       set reserved_cents = reserved_cents - p_reserved_cents,
           actual_cost_cents = actual_cost_cents + p_cost_cents
     where id = p_run_id returning * into r;
    return r;
  end if;

  insert into public.collection_run_items (run_id, org_id, category_id, asin, position, result)
  select p_run_id, r.org_id, cat.category_id, p ->> 'asin', o.n::integer,
         jsonb_build_object('title', p ->> 'title')
    from jsonb_array_elements(coalesce(p_products, '[]'::jsonb)) with ordinality as o(p, n)
  on conflict (run_id, category_id, asin) do nothing;
  get diagnostics found_products = row_count;

  update public.collection_run_categories
     set products = found_products, discovery_cost_cents = p_cost_cents, error = p_error,
         discovered_at = now()
   where run_id = p_run_id and position = p_position;

  if p_error is null then
    insert into public.collection_category_stats (org_id, category_id, products_last_seen, discovery_cost_cents)
    values (r.org_id, cat.category_id, found_products, p_cost_cents)
    on conflict (org_id, category_id) do update
      set products_last_seen = excluded.products_last_seen,
          discovery_cost_cents = excluded.discovery_cost_cents,
          updated_at = now();
  end if;

  update public.collection_runs run
     set reserved_cents = run.reserved_cents - p_reserved_cents,
         actual_cost_cents = run.actual_cost_cents + p_cost_cents,
         total_items = (select coalesce(sum(coalesce(c.products, p_estimated_per_category)), 0)
                          from public.collection_run_categories c where c.run_id = p_run_id),
         checkpoint = jsonb_build_object('category_position', p_position, 'category_id', cat.category_id,
                                         'phase', 'discovered', 'products', found_products),
         status_message = format('Category %s/%s: %s products found', p_position,
                                 cardinality(run.category_ids), found_products)
   where run.id = p_run_id
  returning run.* into r;
  return r;
end
$$;

-- One item finished (done or failed): its result, the run's counters, cost and checkpoint, and the
-- sellers it found, in one statement. An item is counted once: only its first record moves the
-- counters; a second one (a retry after a lost answer) only books the money it spent.
create function public.collection_record_item(
  p_run_id uuid,
  p_token uuid,
  p_category_id text,
  p_asin text,
  p_status text,
  p_attempts integer,
  p_cost_cents bigint,
  p_reserved_cents bigint,
  p_result jsonb,
  p_error text,
  p_sellers jsonb,           -- [{"seller": "...", "listings": 3, "price_cents": 1299}]
  p_worker text
)
returns public.collection_runs
language plpgsql
set search_path = ''
as $$
declare
  r public.collection_runs;
  first_record boolean;
  cat_position integer;
  cat_products integer;
  cat_finished integer;
begin
  if p_status not in ('done', 'failed') then
    raise exception 'an item is recorded as done or failed, not %', p_status using errcode = '22023';
  end if;
  r := public.collection_fenced_run(p_run_id, p_token);

  update public.collection_run_items
     set status = p_status, attempts = attempts + p_attempts, cost_cents = cost_cents + p_cost_cents,
         result = coalesce(result, '{}'::jsonb) || coalesce(p_result, '{}'::jsonb),
         last_error = p_error, worked_by = p_worker, updated_at = now()
   where run_id = p_run_id and category_id = p_category_id and asin = p_asin and status = 'pending';
  first_record := found;
  if not first_record then
    update public.collection_run_items
       set cost_cents = cost_cents + p_cost_cents, attempts = attempts + p_attempts
     where run_id = p_run_id and category_id = p_category_id and asin = p_asin;
    if not found then
      raise exception 'no item % in category % of this run', p_asin, p_category_id using errcode = 'CR003';
    end if;
  end if;

  if first_record and p_status = 'done' then
    insert into public.collection_sellers as s
      (org_id, seller, listings_seen, products_seen, lowest_price_cents, first_run_id, last_run_id)
    select r.org_id, e ->> 'seller', (e ->> 'listings')::bigint, 1, (e ->> 'price_cents')::bigint,
           p_run_id, p_run_id
      from jsonb_array_elements(coalesce(p_sellers, '[]'::jsonb)) e
    on conflict (org_id, seller) do update
      set listings_seen = s.listings_seen + excluded.listings_seen,
          products_seen = s.products_seen + 1,
          lowest_price_cents = least(s.lowest_price_cents, excluded.lowest_price_cents),
          last_run_id = excluded.last_run_id,
          last_seen_at = now();
  end if;

  if first_record then
    update public.collection_category_stats
       set items_processed = items_processed + 1, item_cost_cents = item_cost_cents + p_cost_cents,
           updated_at = now()
     where org_id = r.org_id and category_id = p_category_id;
  end if;

  select c.position, c.products,
         (select count(*) from public.collection_run_items i
           where i.run_id = p_run_id and i.category_id = p_category_id and i.status <> 'pending')
    into cat_position, cat_products, cat_finished
    from public.collection_run_categories c
   where c.run_id = p_run_id and c.category_id = p_category_id;

  update public.collection_runs run
     set reserved_cents = run.reserved_cents - p_reserved_cents,
         actual_cost_cents = run.actual_cost_cents + p_cost_cents,
         processed_items = run.processed_items + case when first_record then 1 else 0 end,
         failed_items = run.failed_items + case when first_record and p_status = 'failed' then 1 else 0 end,
         checkpoint = jsonb_build_object('category_position', cat_position, 'category_id', p_category_id,
                                         'phase', 'items', 'last_asin', p_asin),
         status_message = format('Category %s/%s: %s/%s products', cat_position,
                                 cardinality(run.category_ids), cat_finished, cat_products)
   where run.id = p_run_id
  returning run.* into r;
  return r;
end
$$;

-- Finish a run the caller holds: 'complete' only when every category is discovered and no item is
-- pending (otherwise no row: it is premature); 'fail' with a reason. Releases the lease.
create function public.collection_finish_run(p_run_id uuid, p_token uuid, p_action text, p_reason text)
returns setof public.collection_runs
language plpgsql
set search_path = ''
as $$
declare
  r public.collection_runs;
begin
  r := public.collection_fenced_run(p_run_id, p_token);
  if p_action = 'complete' and (
       exists (select 1 from public.collection_run_categories
                where run_id = p_run_id and discovered_at is null)
       or exists (select 1 from public.collection_run_items
                   where run_id = p_run_id and status = 'pending')) then
    return;
  end if;
  r := public.collection_transition_run(r.org_id, p_run_id, p_action, null, p_reason);
  update public.collection_runs
     set status_message = case p_action
           when 'complete' then format('Completed: %s products, %s failed', processed_items, failed_items)
           else format('Failed: %s', p_reason) end
   where id = p_run_id;
  perform public.collection_release_run(p_run_id, p_token);
  return query select * from public.collection_runs where id = p_run_id;
end
$$;

-- ---------------------------------------------------------------------------------------------------
-- Authorisation and readiness
-- ---------------------------------------------------------------------------------------------------

-- The caller's organisations with the permissions their role grants, for authorisation.
create function public.collection_user_access(p_user_id uuid)
returns table (org_id uuid, org_slug text, role text, permissions text[])
language sql stable
set search_path = ''
as $$
  select o.id, o.slug, m.role,
         coalesce(array_agg(rp.permission_key order by rp.permission_key)
                    filter (where rp.permission_key is not null), '{}')
    from public.memberships m
    join public.organizations o on o.id = m.org_id
    left join public.role_permissions rp on rp.role = m.role
   where m.user_id = p_user_id
   group by o.id, o.slug, m.role
   order by o.slug
$$;

-- Which migrations are applied, for /readyz in both store modes. Through the REST API only the exposed
-- schema (public) is reachable and service_role has no grant on the CLI's own schema, so this one
-- function reads it as its owner (security definer, empty search_path, every name qualified); it
-- answers version strings, nothing else.
create function public.collection_applied_migrations()
returns text[]
language sql stable
security definer
set search_path = ''
as $$
  select coalesce(array_agg(m.version order by m.version), '{}')
    from supabase_migrations.schema_migrations m
$$;

-- ---------------------------------------------------------------------------------------------------
-- Row level security: members read their own org's rows through Supabase clients; all writes go
-- through this service (table owner or service_role).
-- ---------------------------------------------------------------------------------------------------
alter table public.organizations enable row level security;
alter table public.roles enable row level security;
alter table public.role_permissions enable row level security;
alter table public.memberships enable row level security;
alter table public.collection_settings enable row level security;
alter table public.collection_runs enable row level security;
alter table public.collection_run_transitions enable row level security;
alter table public.collection_run_events enable row level security;
alter table public.collection_run_categories enable row level security;
alter table public.collection_run_items enable row level security;
alter table public.collection_sellers enable row level security;
alter table public.collection_category_stats enable row level security;

create policy "members read their organisations" on public.organizations
  for select to authenticated
  using (id in (select m.org_id from public.memberships m where m.user_id = (select auth.uid())));

create policy "members read their memberships" on public.memberships
  for select to authenticated
  using (user_id = (select auth.uid()));

create policy "authenticated read roles" on public.roles
  for select to authenticated using (true);

create policy "authenticated read role permissions" on public.role_permissions
  for select to authenticated using (true);

create policy "authenticated read transitions" on public.collection_run_transitions
  for select to authenticated using (true);

create policy "members read their org settings" on public.collection_settings
  for select to authenticated
  using (org_id in (select m.org_id from public.memberships m where m.user_id = (select auth.uid())));

create policy "members read their org runs" on public.collection_runs
  for select to authenticated
  using (org_id in (select m.org_id from public.memberships m where m.user_id = (select auth.uid())));

create policy "members read their org run events" on public.collection_run_events
  for select to authenticated
  using (org_id in (select m.org_id from public.memberships m where m.user_id = (select auth.uid())));

create policy "members read their org run categories" on public.collection_run_categories
  for select to authenticated
  using (run_id in (select r.id from public.collection_runs r)); -- runs' own policy narrows this

create policy "members read their org run items" on public.collection_run_items
  for select to authenticated
  using (org_id in (select m.org_id from public.memberships m where m.user_id = (select auth.uid())));

create policy "members read their org sellers" on public.collection_sellers
  for select to authenticated
  using (org_id in (select m.org_id from public.memberships m where m.user_id = (select auth.uid())));

create policy "members read their org category stats" on public.collection_category_stats
  for select to authenticated
  using (org_id in (select m.org_id from public.memberships m where m.user_id = (select auth.uid())));

-- Grants: reads for signed-in members (narrowed by the policies), nothing for anon, everything for
-- service_role (the REST mode's key; the direct mode connects as the tables' owner).
revoke all on all tables in schema public from anon, authenticated;
grant select on all tables in schema public to authenticated;
grant all on all tables in schema public to service_role;

-- Every function in public is ours and only for this service: none for anon or authenticated
-- (Supabase's default privileges would grant them), all for service_role. A later migration that adds
-- a function repeats these two lines.
revoke execute on all functions in schema public from public, anon, authenticated;
grant execute on all functions in schema public to service_role;
