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
  -- This organisation's share of the provider account's rate, against the other organisations with
  -- work at the same time (collection_next_work): 2 gets twice the calls of 1.
  rate_weight integer not null default 1 check (rate_weight between 1 and 100),
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
  -- Units of work (a discovery or an item) handed out so far: runs of one organisation take turns by it.
  served_units bigint not null default 0 check (served_units >= 0),
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
-- Handing out work: the running runs of each organisation, least served first.
create index collection_runs_running_idx on public.collection_runs (org_id, served_units, started_at, id)
  where status = 'running';

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
-- A category's discovery and each item are units of work: one process holds a unit under a lease
-- (lease_token, renewed by its heartbeats) with what it reserved of the budget for it (reserved_cents,
-- also counted in the run's reserved_cents). A lease that expires (its process died) gives the unit
-- to whoever asks next, and what was reserved becomes an uncertain charge.
create table public.collection_run_categories (
  run_id uuid not null references public.collection_runs (id) on delete cascade,
  position integer not null check (position >= 1),
  category_id text not null,
  products integer check (products >= 0),
  discovery_cost_cents bigint not null default 0 check (discovery_cost_cents >= 0),
  error text,
  discovered_at timestamptz,
  lease_owner text,
  lease_token uuid,
  lease_expires_at timestamptz,
  reserved_cents bigint not null default 0 check (reserved_cents >= 0),
  primary key (run_id, position),
  unique (run_id, category_id),
  check ((lease_token is null) = (lease_expires_at is null))
);
create index collection_run_categories_undiscovered_idx on public.collection_run_categories (run_id, position)
  where discovered_at is null;
create index collection_run_categories_leased_idx on public.collection_run_categories (lease_token)
  where lease_token is not null;

create table public.collection_run_items (
  run_id uuid not null references public.collection_runs (id) on delete cascade,
  org_id uuid not null references public.organizations (id) on delete cascade,
  category_id text not null,
  category_position integer not null check (category_position >= 1),
  asin text not null check (char_length(asin) between 1 and 32),
  position integer not null,
  status text not null default 'pending' check (status in ('pending', 'done', 'failed')),
  attempts integer not null default 0 check (attempts >= 0),
  cost_cents bigint not null default 0 check (cost_cents >= 0),
  result jsonb,
  last_error text,
  worked_by text,
  lease_owner text,
  lease_token uuid,
  lease_expires_at timestamptz,
  reserved_cents bigint not null default 0 check (reserved_cents >= 0),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (run_id, category_id, asin),
  check ((lease_token is null) = (lease_expires_at is null)),
  check (lease_token is null or status = 'pending')
);
create index collection_run_items_pending_idx
  on public.collection_run_items (run_id, category_position, position) where status = 'pending';
create index collection_run_items_leased_idx on public.collection_run_items (lease_token)
  where lease_token is not null;
create index collection_run_items_listing_idx
  on public.collection_run_items (run_id, status, category_position, position);

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
-- Sharing one provider account among every process: rate limits and fair turns. No coordinator: each
-- grant is one statement on these rows (collection_next_work, collection_take_slot).
-- ---------------------------------------------------------------------------------------------------

-- A limit on calls to the provider: 'provider' (every call of the account), 'provider:rendered' (calls
-- that render a page), 'source:<name>' (one source, when it is slowed for failing). GCRA: next_at is
-- the earliest time the next call may be made; each grant moves it on by one interval of the rate in
-- force (collection_rate_per_s), so calls from every process together are spaced as one stream.
create table public.collection_rate_limits (
  name text primary key check (char_length(name) between 1 and 64),
  per_s double precision not null default 0 check (per_s >= 0),  -- the configured limit; 0: none
  ceiling_per_s double precision check (ceiling_per_s > 0),      -- what the provider's headers said
  throttled_per_s double precision check (throttled_per_s > 0),   -- after a 429, recovering
  throttled_at timestamptz,
  slowed_per_s double precision check (slowed_per_s > 0),         -- a failing source, until slowed_until
  slowed_until timestamptz,
  next_at timestamptz not null default '-infinity',
  throttles bigint not null default 0 check (throttles >= 0),
  updated_at timestamptz not null default now()
);

-- Fair turns between organisations (start-time fair queuing): each unit handed out moves its
-- organisation's virtual time on by 1 / its rate_weight, and the next unit goes to the organisation
-- with work whose virtual time is lowest. An organisation that had no work restarts at the clock (the
-- start tag of the last unit handed out), so it gets its share from then on, not a catch-up burst.
create table public.collection_scheduler (
  id boolean primary key default true check (id),
  vclock double precision not null default 0
);
insert into public.collection_scheduler (id) values (true);

create table public.collection_org_turns (
  org_id uuid primary key references public.organizations (id) on delete cascade,
  vtime double precision not null default 0
);

-- The executor processes alive (each renews its row with its heartbeat): how many share the account.
create table public.collection_executors (
  token uuid primary key,
  owner text not null,
  lease_expires_at timestamptz not null
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
  p_max_concurrent_runs integer default null,
  p_rate_weight integer default null
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
         rate_weight = coalesce(p_rate_weight, rate_weight),
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
      select jsonb_agg(to_jsonb(page) order by page.category_position, page.position)
        from (select i.run_id, i.category_id, i.category_position, i.asin, i.position, i.status,
                     i.attempts, i.cost_cents, i.result, i.last_error, i.worked_by, i.updated_at
                from public.collection_run_items i
               where i.run_id = p_run_id and i.org_id = p_org_id
                 and (p_status is null or i.status = p_status)
               order by i.category_position, i.position
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
-- The executor. Every process asks for units of work (collection_next_work) as it has room for calls;
-- each unit comes with its budget reserved and a slot of the account's rate. Every write about a unit
-- is fenced by the lease token it was handed out under, so a process that lost a lease cannot write.
-- ---------------------------------------------------------------------------------------------------

-- The rate a limit allows now, in calls a second (null: no limit). Planned 10 % below the limit: the
-- provider counts calls in its own windows, on its own clock, as they arrive, and a call that leaves a
-- little late (a busy event loop, a slow round trip) meets the next one on time in the same window.
create function public.collection_rate_per_s(r public.collection_rate_limits, p_now timestamptz)
returns double precision
language plpgsql immutable
set search_path = ''
as $$
declare
  headroom constant double precision := 0.90;
  recovery_s constant double precision := 30;
  limit_per_s double precision := least(nullif(r.per_s, 0), r.ceiling_per_s);
  rate double precision := limit_per_s * headroom;
  since double precision;
begin
  if r.throttled_at is not null then
    -- After a 429: back to the limit in a straight line over recovery_s (with no known limit, a 429
    -- says there is one: up from the rate that was refused, 10 % of it a second).
    since := extract(epoch from p_now - r.throttled_at);
    if rate is not null then
      rate := least(rate, r.throttled_per_s + (rate - r.throttled_per_s) * least(1, since / recovery_s));
    elsif since < 60 then
      rate := r.throttled_per_s * (1 + since / 10);
    end if;
  end if;
  if r.slowed_until > p_now then
    rate := least(coalesce(rate, r.slowed_per_s), r.slowed_per_s);
  end if;
  return rate;
end
$$;

-- The limits as this process's settings give them (the last process to start decides; the others'
-- logs say when they disagree). Throttling and slowing already in force are kept.
create function public.collection_configure_rates(p_rates jsonb)
returns setof public.collection_rate_limits
language sql
set search_path = ''
as $$
  insert into public.collection_rate_limits as r (name, per_s)
  select key, value::double precision from jsonb_each_text(p_rates)
  on conflict (name) do update set per_s = excluded.per_s, updated_at = now()
  returning r.*
$$;

-- A slot for the next call that must keep within all of p_buckets: granted with the time to wait for
-- it, or (the slot would be more than p_horizon_s away) refused with the time to ask again. The
-- buckets are locked in name order, so callers asking for several never wait on each other in a ring.
create function public.collection_take_slot(
  p_buckets text[], p_horizon_s double precision, out granted boolean, out wait_s double precision
)
language plpgsql
set search_path = ''
as $$
declare
  now_ timestamptz := clock_timestamp();
  start_at timestamptz;
begin
  perform 1 from public.collection_rate_limits where name = any (p_buckets) order by name for update;
  select max(greatest(r.next_at, now_)) into start_at
    from public.collection_rate_limits r where r.name = any (p_buckets);
  if start_at is null then  -- none of these has a limit
    granted := true;
    wait_s := 0;
    return;
  end if;
  if start_at > now_ + make_interval(secs => p_horizon_s) then
    granted := false;
    wait_s := extract(epoch from start_at - now_)::double precision - p_horizon_s;
    return;
  end if;
  update public.collection_rate_limits r
     set next_at = coalesce(start_at + make_interval(secs => 1 / public.collection_rate_per_s(r, now_)),
                            r.next_at)
   where r.name = any (p_buckets);
  granted := true;
  wait_s := greatest(extract(epoch from start_at - now_), 0)::double precision;
end
$$;

-- The provider answered 429 (the account's rate was exceeded, whoever sent the call): every process
-- slows down. Each limit drops to 70 % of the rate in force and recovers (collection_rate_per_s); the
-- next call waits a second.
create function public.collection_throttle(p_buckets text[], p_refused_per_s double precision)
returns void
language plpgsql
set search_path = ''
as $$
declare
  now_ timestamptz := clock_timestamp();
begin
  insert into public.collection_rate_limits (name) select unnest(p_buckets) on conflict (name) do nothing;
  perform 1 from public.collection_rate_limits where name = any (p_buckets) order by name for update;
  -- Refusals within a second of the last cut are the same excess seen again (calls already under way
  -- when it happened): counted, not cut again.
  update public.collection_rate_limits r
     set throttled_per_s = case when r.throttled_at > now_ - interval '1 second' then r.throttled_per_s
                                else greatest(0.7 * coalesce(public.collection_rate_per_s(r, now_), p_refused_per_s), 0.5)
                           end,
         throttled_at = case when r.throttled_at > now_ - interval '1 second' then r.throttled_at else now_ end,
         next_at = greatest(r.next_at, now_ + interval '1 second'),
         throttles = r.throttles + 1,
         updated_at = now()
   where r.name = any (p_buckets);
end
$$;

-- The provider's own headers (x-ratelimit-<name>-limit): a limit lower than the configured one is the
-- one planned for; a higher one changes nothing.
create function public.collection_observe_rate_limit(p_bucket text, p_limit_per_s double precision)
returns void
language sql
set search_path = ''
as $$
  update public.collection_rate_limits
     set ceiling_per_s = p_limit_per_s, updated_at = now()
   where name = p_bucket and p_limit_per_s > 0 and ceiling_per_s is distinct from p_limit_per_s
$$;

-- A source that keeps failing is slowed for everyone (as the provider slows a domain whose success rate
-- falls), to p_per_s for p_for_s.
create function public.collection_slow_source(p_source text, p_per_s double precision, p_for_s double precision)
returns void
language sql
set search_path = ''
as $$
  insert into public.collection_rate_limits as r (name, slowed_per_s, slowed_until)
  values ('source:' || p_source, p_per_s, now() + make_interval(secs => p_for_s))
  on conflict (name) do update
    set slowed_per_s = excluded.slowed_per_s, slowed_until = excluded.slowed_until, updated_at = now()
$$;

-- Pause a running run whose next unit would pass its cap.
create function public.collection_pause_for_budget(p_run_id uuid)
returns void
language plpgsql
set search_path = ''
as $$
declare
  r public.collection_runs;
begin
  select * into r from public.collection_runs where id = p_run_id for update;
  if r.status <> 'running' then
    return;
  end if;
  perform public.collection_transition_run(r.org_id, r.id, 'pause', null, 'budget_exhausted');
  update public.collection_runs
     set status_message = format('Paused: budget exhausted (%s of %s cents spent or in flight)',
                                 r.actual_cost_cents + r.reserved_cents, r.budget_cap_cents)
   where id = r.id;
end
$$;

-- A running run that has nothing left to do (every category discovered, no item pending) is completed.
create function public.collection_complete_if_done(p_run_id uuid)
returns void
language plpgsql
set search_path = ''
as $$
declare
  r public.collection_runs;
begin
  if exists (select 1 from public.collection_run_categories where run_id = p_run_id and discovered_at is null)
     or exists (select 1 from public.collection_run_items where run_id = p_run_id and status = 'pending') then
    return;
  end if;
  select * into r from public.collection_runs where id = p_run_id for update;
  if r.status <> 'running' then
    return;
  end if;
  if (select bool_and(error is not null) from public.collection_run_categories where run_id = p_run_id) then
    -- Nothing could be collected: calling that "completed" would hide the failure.
    perform public.collection_fail_unheld(r.id, format('no category could be discovered (%s)',
      (select error from public.collection_run_categories where run_id = p_run_id order by position limit 1)));
    return;
  end if;
  perform public.collection_transition_run(r.org_id, r.id, 'complete', null, null);
  update public.collection_runs
     set status_message = format('Completed: %s products, %s failed', processed_items, failed_items)
   where id = r.id;
end
$$;

-- Fail a run (running or paused) with a reason, whoever holds its units.
create function public.collection_fail_unheld(p_run_id uuid, p_reason text)
returns void
language plpgsql
set search_path = ''
as $$
declare
  r public.collection_runs;
begin
  select * into r from public.collection_runs where id = p_run_id for update;
  if r.status not in ('running', 'paused') then
    return;
  end if;
  perform public.collection_transition_run(r.org_id, r.id, 'fail', null, p_reason);
  update public.collection_runs set status_message = format('Failed: %s', p_reason) where id = r.id;
end
$$;

-- Up to p_limit units of work for process (p_owner, p_token), one after another in one transaction (one
-- hold of the scheduler for a process's idle workers together). Each is the fair choice among every running run of every
-- organisation (see collection_scheduler), its cost reserved on the run's budget (a run whose next unit
-- would pass its cap is paused instead, and the next run asked), leased for p_lease_s, with a slot of
-- the account's rate for its first call (wait_s). Kinds: 'discovery' (a category's best sellers, a
-- rendered call), 'item' (a product), or 'wait' (the account has no slot within p_horizon_s: ask again
-- in wait_s; only ever alone). No row: no work anywhere. A unit whose lease expired (or that an earlier process with the
-- same owner held) is handed out again; what it had reserved may have been charged: uncertain cost.
create function public.collection_next_work(
  p_owner text,
  p_token uuid,
  p_lease_s integer,
  p_horizon_s double precision,
  p_item_cents bigint,
  p_discovery_cents bigint,
  p_limit integer
)
returns table (
  kind text,
  run_id uuid,
  org_id uuid,
  category_id text,
  category_position integer,
  asin text,
  item_position integer,
  reserved_cents bigint,
  wait_s double precision
)
language plpgsql
set search_path = ''
as $$
#variable_conflict use_column
declare
  now_ timestamptz := clock_timestamp();
  horizon timestamptz := now_ + make_interval(secs => p_horizon_s);
  lease_until timestamptz := now_ + make_interval(secs => p_lease_s);
  account_at timestamptz;
  discovery_ok boolean;
  items_ok boolean;
  clock double precision;
  o record;
  r record;
  cat public.collection_run_categories;
  it public.collection_run_items;
  unit text;
  cost bigint;
  left_over bigint;
  slot record;
  handed integer := 0;
begin
  <<units>>
  while handed < p_limit loop
  -- Capacity first: without a slot within the horizon, say when to ask again (when nothing is handed).
  select greatest(l.next_at, now_) into account_at from public.collection_rate_limits l where l.name = 'provider';
  if account_at > horizon then
    if handed = 0 then
      return query select 'wait'::text, null::uuid, null::uuid, null::text, null::integer, null::text,
                          null::integer, 0::bigint, extract(epoch from account_at - horizon)::double precision;
    end if;
    return;
  end if;
  discovery_ok := coalesce((select bool_and(greatest(l.next_at, now_) <= horizon)
                              from public.collection_rate_limits l
                             where l.name in ('provider:rendered', 'source:amazon_bestsellers')), true);
  items_ok := coalesce((select bool_and(greatest(l.next_at, now_) <= horizon)
                          from public.collection_rate_limits l
                         where l.name in ('source:amazon_product', 'source:ebay_search')), true);
  if handed = 0 then
    -- One hand-out at a time, in fair order: the scheduler's row is held until this commits.
    select s.vclock into clock from public.collection_scheduler s for update;
  end if;

  for o in
    select a.org_id, greatest(coalesce(t.vtime, 0), clock) as start_tag, coalesce(st.rate_weight, 1) as weight
      from (select distinct x.org_id from public.collection_runs x where x.status = 'running') a
      left join public.collection_org_turns t on t.org_id = a.org_id
      left join public.collection_settings st on st.org_id = a.org_id
     order by 2, 1
  loop
    for r in
      select x.id from public.collection_runs x
       where x.org_id = o.org_id and x.status = 'running'
       order by x.served_units, x.started_at, x.id
    loop
      unit := null;
      if discovery_ok then
        select * into cat from public.collection_run_categories c
         where c.run_id = r.id and c.discovered_at is null
           and (c.lease_token is null or c.lease_expires_at < now_
                or (c.lease_owner = p_owner and c.lease_token <> p_token))
         order by c.position
         limit 1
         for update skip locked;
        if found then
          unit := 'discovery';
          cost := p_discovery_cents;
          left_over := cat.reserved_cents;
        end if;
      end if;
      if unit is null and items_ok then
        select * into it from public.collection_run_items i
         where i.run_id = r.id and i.status = 'pending'
           and (i.lease_token is null or i.lease_expires_at < now_
                or (i.lease_owner = p_owner and i.lease_token <> p_token))
         order by i.category_position, i.position
         limit 1
         for update skip locked;
        if found then
          unit := 'item';
          cost := p_item_cents;
          left_over := it.reserved_cents;
        end if;
      end if;
      if unit is null then
        perform public.collection_complete_if_done(r.id);  -- e.g. resumed with nothing left
        continue;
      end if;

      -- The budget: this unit's worst-case cost, before any call is made.
      update public.collection_runs x
         set reserved_cents = x.reserved_cents - left_over + cost,
             actual_cost_cents = x.actual_cost_cents + left_over,
             uncertain_cost_cents = x.uncertain_cost_cents + left_over,
             served_units = x.served_units + 1
       where x.id = r.id and x.status = 'running'
         and x.actual_cost_cents + x.reserved_cents + cost <= x.budget_cap_cents;
      if not found then
        update public.collection_runs x
           set reserved_cents = x.reserved_cents - left_over,
               actual_cost_cents = x.actual_cost_cents + left_over,
               uncertain_cost_cents = x.uncertain_cost_cents + left_over
         where x.id = r.id;
        if unit = 'discovery' then
          update public.collection_run_categories c
             set lease_owner = null, lease_token = null, lease_expires_at = null, reserved_cents = 0
           where c.run_id = cat.run_id and c.position = cat.position;
        else
          update public.collection_run_items i
             set lease_owner = null, lease_token = null, lease_expires_at = null, reserved_cents = 0
           where i.run_id = it.run_id and i.category_id = it.category_id and i.asin = it.asin;
        end if;
        perform public.collection_pause_for_budget(r.id);
        continue;
      end if;

      if unit = 'discovery' then
        update public.collection_run_categories c
           set lease_owner = p_owner, lease_token = p_token, lease_expires_at = lease_until,
               reserved_cents = cost
         where c.run_id = cat.run_id and c.position = cat.position;
        select * into slot
          from public.collection_take_slot(
                 array['provider', 'provider:rendered', 'source:amazon_bestsellers'], 2 * p_horizon_s);
      else
        update public.collection_run_items i
           set lease_owner = p_owner, lease_token = p_token, lease_expires_at = lease_until,
               reserved_cents = cost
         where i.run_id = it.run_id and i.category_id = it.category_id and i.asin = it.asin;
        select * into slot
          from public.collection_take_slot(array['provider', 'source:amazon_product'], 2 * p_horizon_s);
      end if;

      insert into public.collection_org_turns as t (org_id, vtime)
      values (o.org_id, o.start_tag + 1.0 / o.weight)
      on conflict (org_id) do update set vtime = excluded.vtime;
      update public.collection_scheduler set vclock = o.start_tag;
      clock := o.start_tag;

      if unit = 'discovery' then
        return query select unit, r.id, o.org_id, cat.category_id, cat.position, null::text, null::integer,
                            cost, slot.wait_s;
      else
        return query select unit, r.id, o.org_id, it.category_id, it.category_position, it.asin, it.position,
                            cost, slot.wait_s;
      end if;
      handed := handed + 1;
      continue units;  -- the next unit, in the order the turns now give
    end loop;
  end loop;
  return;  -- nothing (more) to hand out anywhere
  end loop;
end
$$;

-- This process is alive: its units' leases renewed, its place among the executors kept. Units whose
-- holder died (lease expired) are freed, their reservations turned into uncertain charges. Answers how
-- many executors share the account and the rates in force (null: no limit).
create function public.collection_heartbeat(p_owner text, p_token uuid, p_lease_s integer)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  now_ timestamptz := clock_timestamp();
  lease_until timestamptz := now_ + make_interval(secs => p_lease_s);
begin
  update public.collection_run_items set lease_expires_at = lease_until where lease_token = p_token;
  update public.collection_run_categories set lease_expires_at = lease_until where lease_token = p_token;
  insert into public.collection_executors (token, owner, lease_expires_at)
  values (p_token, p_owner, lease_until)
  on conflict (token) do update set lease_expires_at = excluded.lease_expires_at;
  delete from public.collection_executors where lease_expires_at < now_ - interval '1 minute';
  perform public.collection_free_units(null, now_);
  return jsonb_build_object(
    'executors', (select count(*) from public.collection_executors where lease_expires_at >= now_),
    'rates', coalesce((select jsonb_object_agg(l.name, public.collection_rate_per_s(l, now_))
                         from public.collection_rate_limits l), '{}'::jsonb)
  );
end
$$;

-- Free units: those of p_token (null: every unit whose lease expired before p_at). Their calls may have
-- been made and charged: what they had reserved becomes actual, uncertain cost.
create function public.collection_free_units(p_token uuid, p_at timestamptz)
returns void
language plpgsql
set search_path = ''
as $$
begin
  with freed as (
    select i.run_id, i.category_id, i.asin, i.reserved_cents
      from public.collection_run_items i
     where i.lease_token is not null
       and (i.lease_token = p_token or (p_token is null and i.lease_expires_at < p_at))
       for update skip locked
  ), cleared as (
    update public.collection_run_items i
       set lease_owner = null, lease_token = null, lease_expires_at = null, reserved_cents = 0
      from freed f
     where i.run_id = f.run_id and i.category_id = f.category_id and i.asin = f.asin
    returning f.run_id, f.reserved_cents
  ), per_run as (
    select run_id, sum(reserved_cents) as cents from cleared group by run_id
  )
  update public.collection_runs x
     set reserved_cents = x.reserved_cents - p.cents,
         actual_cost_cents = x.actual_cost_cents + p.cents,
         uncertain_cost_cents = x.uncertain_cost_cents + p.cents
    from per_run p
   where x.id = p.run_id and p.cents > 0;

  with freed as (
    select c.run_id, c.position, c.reserved_cents
      from public.collection_run_categories c
     where c.lease_token is not null
       and (c.lease_token = p_token or (p_token is null and c.lease_expires_at < p_at))
       for update skip locked
  ), cleared as (
    update public.collection_run_categories c
       set lease_owner = null, lease_token = null, lease_expires_at = null, reserved_cents = 0
      from freed f
     where c.run_id = f.run_id and c.position = f.position
    returning f.run_id, f.reserved_cents
  ), per_run as (
    select run_id, sum(reserved_cents) as cents from cleared group by run_id
  )
  update public.collection_runs x
     set reserved_cents = x.reserved_cents - p.cents,
         actual_cost_cents = x.actual_cost_cents + p.cents,
         uncertain_cost_cents = x.uncertain_cost_cents + p.cents
    from per_run p
   where x.id = p.run_id and p.cents > 0;
end
$$;

-- A process stops: every unit it holds goes back at once (what they had reserved: uncertain cost), and
-- it no longer counts among the executors.
create function public.collection_release_work(p_token uuid)
returns void
language plpgsql
set search_path = ''
as $$
begin
  perform public.collection_free_units(p_token, null);
  delete from public.collection_executors where token = p_token;
end
$$;

-- The unit (p_category_id, p_asin; a null p_asin is the category's discovery) held under p_token,
-- locked; CR005 when the caller no longer holds it.
create function public.collection_held_unit(p_run_id uuid, p_token uuid, p_category_id text, p_asin text)
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  reserved bigint;
begin
  if p_asin is null then
    select c.reserved_cents into reserved from public.collection_run_categories c
     where c.run_id = p_run_id and c.category_id = p_category_id and c.lease_token = p_token
       and c.discovered_at is null
       for update;
  else
    select i.reserved_cents into reserved from public.collection_run_items i
     where i.run_id = p_run_id and i.category_id = p_category_id and i.asin = p_asin
       and i.lease_token = p_token and i.status = 'pending'
       for update;
  end if;
  if not found then
    raise exception 'lease lost' using errcode = 'CR005';
  end if;
  return reserved;
end
$$;

-- A unit its process gives back. Before any call was made (it stops while waiting for its slot), its
-- reservation is released and nothing charged; after its calls were made (p_calls_made: its checkpoint
-- could not be written), what it had reserved may have been charged: an uncertain cost. Either way it
-- goes back to be done by whoever asks next.
create function public.collection_give_back_work(
  p_run_id uuid, p_token uuid, p_category_id text, p_asin text, p_calls_made boolean
)
returns void
language plpgsql
set search_path = ''
as $$
declare
  reserved bigint := public.collection_held_unit(p_run_id, p_token, p_category_id, p_asin);
  charged bigint := case when p_calls_made then reserved else 0 end;
begin
  if p_asin is null then
    update public.collection_run_categories
       set lease_owner = null, lease_token = null, lease_expires_at = null, reserved_cents = 0
     where run_id = p_run_id and category_id = p_category_id;
  else
    update public.collection_run_items
       set lease_owner = null, lease_token = null, lease_expires_at = null, reserved_cents = 0
     where run_id = p_run_id and category_id = p_category_id and asin = p_asin;
  end if;
  update public.collection_runs
     set reserved_cents = reserved_cents - reserved,
         actual_cost_cents = actual_cost_cents + charged,
         uncertain_cost_cents = uncertain_cost_cents + charged,
         -- not served after all: its turn is not counted against the run
         served_units = case when p_calls_made then served_units else greatest(served_units - 1, 0) end
   where id = p_run_id;
end
$$;

-- The provider cannot serve the run at all (e.g. it refused the credentials): the unit's call was not
-- charged, its reservation is released, and the run fails with the reason.
create function public.collection_fail_run(
  p_run_id uuid, p_token uuid, p_category_id text, p_asin text, p_reason text
)
returns setof public.collection_runs
language plpgsql
set search_path = ''
as $$
begin
  perform public.collection_give_back_work(p_run_id, p_token, p_category_id, p_asin, false);
  perform public.collection_fail_unheld(p_run_id, p_reason);
  return query select * from public.collection_runs where id = p_run_id;
end
$$;

-- ---------------------------------------------------------------------------------------------------
-- Checkpoints: one atomic, fenced statement per unit of work, recorded once (only the holder of the
-- unit's lease can record it, and recording ends the lease).
-- ---------------------------------------------------------------------------------------------------

-- A category's products were discovered (or discovery failed: p_error, no products).
create function public.collection_record_discovery(
  p_run_id uuid,
  p_token uuid,
  p_category_id text,
  p_products jsonb,          -- [{"asin": "...", "title": "..."}]
  p_cost_cents bigint,
  p_error text,
  p_estimated_per_category integer
)
returns public.collection_runs
language plpgsql
set search_path = ''
as $$
declare
  reserved bigint := public.collection_held_unit(p_run_id, p_token, p_category_id, null);
  cat public.collection_run_categories;
  r public.collection_runs;
  found_products integer;
begin
  select * into cat from public.collection_run_categories where run_id = p_run_id and category_id = p_category_id;
  select * into r from public.collection_runs where id = p_run_id for update;

  insert into public.collection_run_items (run_id, org_id, category_id, category_position, asin, position, result)
  select p_run_id, r.org_id, cat.category_id, cat.position, p ->> 'asin', o.n::integer,
         jsonb_build_object('title', p ->> 'title')
    from jsonb_array_elements(coalesce(p_products, '[]'::jsonb)) with ordinality as o(p, n)
  on conflict (run_id, category_id, asin) do nothing;
  get diagnostics found_products = row_count;

  update public.collection_run_categories
     set products = found_products, discovery_cost_cents = p_cost_cents, error = p_error,
         discovered_at = now(), lease_owner = null, lease_token = null, lease_expires_at = null,
         reserved_cents = 0
   where run_id = p_run_id and category_id = p_category_id;

  if p_error is null then
    insert into public.collection_category_stats (org_id, category_id, products_last_seen, discovery_cost_cents)
    values (r.org_id, cat.category_id, found_products, p_cost_cents)
    on conflict (org_id, category_id) do update
      set products_last_seen = excluded.products_last_seen,
          discovery_cost_cents = excluded.discovery_cost_cents,
          updated_at = now();
  end if;

  update public.collection_runs run
     set reserved_cents = run.reserved_cents - reserved,
         actual_cost_cents = run.actual_cost_cents + p_cost_cents,
         total_items = (select coalesce(sum(coalesce(c.products, p_estimated_per_category)), 0)
                          from public.collection_run_categories c where c.run_id = p_run_id),
         checkpoint = jsonb_build_object('category_position', cat.position, 'category_id', cat.category_id,
                                         'phase', 'discovered', 'products', found_products),
         status_message = format('Category %s/%s: %s products found', cat.position,
                                 cardinality(run.category_ids), found_products)
   where run.id = p_run_id;

  perform public.collection_complete_if_done(p_run_id);
  select * into r from public.collection_runs where id = p_run_id;
  return r;
end
$$;

-- One item finished (done or failed): its result, the run's counters, cost and checkpoint, and the
-- sellers it found, in one statement. Then what follows from it: the run fails when more than
-- p_max_failed_share of its products failed (once p_min_items are processed), and completes when
-- nothing is left to do. The run row is locked before that check, so the records of a run's last
-- items are judged one after the other.
create function public.collection_record_item(
  p_run_id uuid,
  p_token uuid,
  p_category_id text,
  p_asin text,
  p_status text,
  p_attempts integer,
  p_cost_cents bigint,
  p_result jsonb,
  p_error text,
  p_sellers jsonb,           -- [{"seller": "...", "listings": 3, "price_cents": 1299}]
  p_worker text,
  p_max_failed_share double precision,
  p_min_items integer
)
returns public.collection_runs
language plpgsql
set search_path = ''
as $$
declare
  reserved bigint;
  r public.collection_runs;
  cat_position integer;
  cat_products integer;
  cat_finished integer;
begin
  if p_status not in ('done', 'failed') then
    raise exception 'an item is recorded as done or failed, not %', p_status using errcode = '22023';
  end if;
  reserved := public.collection_held_unit(p_run_id, p_token, p_category_id, p_asin);

  update public.collection_run_items
     set status = p_status, attempts = attempts + p_attempts, cost_cents = cost_cents + p_cost_cents,
         result = coalesce(result, '{}'::jsonb) || coalesce(p_result, '{}'::jsonb),
         last_error = p_error, worked_by = p_worker, updated_at = now(),
         lease_owner = null, lease_token = null, lease_expires_at = null, reserved_cents = 0
   where run_id = p_run_id and category_id = p_category_id and asin = p_asin;

  select * into r from public.collection_runs where id = p_run_id for update;
  if p_status = 'done' then
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

  update public.collection_category_stats
     set items_processed = items_processed + 1, item_cost_cents = item_cost_cents + p_cost_cents,
         updated_at = now()
   where org_id = r.org_id and category_id = p_category_id;

  select c.position, c.products,
         (select count(*) from public.collection_run_items i
           where i.run_id = p_run_id and i.category_id = p_category_id and i.status <> 'pending')
    into cat_position, cat_products, cat_finished
    from public.collection_run_categories c
   where c.run_id = p_run_id and c.category_id = p_category_id;

  update public.collection_runs run
     set reserved_cents = run.reserved_cents - reserved,
         actual_cost_cents = run.actual_cost_cents + p_cost_cents,
         processed_items = run.processed_items + 1,
         failed_items = run.failed_items + case when p_status = 'failed' then 1 else 0 end,
         checkpoint = jsonb_build_object('category_position', cat_position, 'category_id', p_category_id,
                                         'phase', 'items', 'last_asin', p_asin),
         status_message = format('Category %s/%s: %s/%s products', cat_position,
                                 cardinality(run.category_ids), cat_finished, cat_products)
   where run.id = p_run_id
  returning run.* into r;

  if r.processed_items >= p_min_items and r.failed_items > r.processed_items * p_max_failed_share then
    perform public.collection_fail_unheld(p_run_id, format('%s of %s products failed, more than %s%%',
      r.failed_items, r.processed_items, round((p_max_failed_share * 100)::numeric)));
  else
    perform public.collection_complete_if_done(p_run_id);
  end if;
  select * into r from public.collection_runs where id = p_run_id;
  return r;
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
-- The executor's shared state: for this service alone (no policy: no rows for signed-in users).
alter table public.collection_rate_limits enable row level security;
alter table public.collection_scheduler enable row level security;
alter table public.collection_org_turns enable row level security;
alter table public.collection_executors enable row level security;

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
