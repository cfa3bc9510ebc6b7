-- Collection runs (plan 06-02): organisations, memberships, permissions, per-org settings, runs and
-- their append-only event log, plus the SQL functions that enforce every multi-row invariant.
--
-- Applies unchanged to a hosted Supabase project (`supabase db push`) and to the embedded Postgres
-- (after supabase/local/bootstrap.sql has created what Supabase provides: roles, auth.uid()).
--
-- Errors raised by the functions use SQLSTATE class 'CR' so every client (asyncpg, PostgREST) can map
-- them to the same domain error:
--   CR001 budget exceeded        CR002 concurrent run limit
--   CR003 run not found          CR004 transition not allowed

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
-- Settings, runs, events
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
  total_items integer not null default 0 check (total_items >= 0),
  processed_items integer not null default 0 check (processed_items >= 0),
  failed_items integer not null default 0 check (failed_items between 0 and processed_items),
  category_ids text[] not null check (public.collection_category_ids_valid(category_ids)),
  checkpoint jsonb,
  started_at timestamptz,
  completed_at timestamptz,
  paused_at timestamptz,
  created_by uuid references auth.users (id) on delete set null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  check (completed_at is null or status in ('completed', 'failed', 'cancelled')),
  check (paused_at is null or status in ('paused', 'cancelled'))
);
-- Listing: newest first within an org (id breaks ties so pages are stable).
create index collection_runs_org_created_idx on public.collection_runs (org_id, created_at desc, id desc);
-- Concurrency limit: counting an org's active runs touches only active rows.
create index collection_runs_org_active_idx on public.collection_runs (org_id)
  where status in ('pending', 'running', 'paused');
-- Start-up recovery: interrupted runs across all orgs.
create index collection_runs_interrupted_idx on public.collection_runs (created_at)
  where status in ('running', 'paused');

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

-- One unit of work recorded once: the idempotency key of a checkpoint.
create table public.collection_run_steps (
  run_id uuid not null references public.collection_runs (id) on delete cascade,
  step_key text not null check (char_length(step_key) between 1 and 200),
  processed_delta integer not null check (processed_delta >= 0),
  failed_delta integer not null check (failed_delta between 0 and processed_delta),
  cost_cents bigint not null check (cost_cents >= 0),
  created_at timestamptz not null default now(),
  primary key (run_id, step_key)
);

-- ---------------------------------------------------------------------------------------------------
-- Event log: every status change is recorded by the database itself, whoever makes it.
-- The actor and reason come from transaction-local settings the functions set.
-- ---------------------------------------------------------------------------------------------------
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
-- Functions: the only write path. One call = one round trip = one atomic step.
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

-- Budget cap + concurrency limit + insert, under the org's settings row lock, so two creates in
-- the same org are serialised and neither can slip past a limit the other is about to reach.
create function public.collection_create_run(
  p_org_id uuid,
  p_created_by uuid,
  p_name text,
  p_category_ids text[],
  p_estimated_cost_cents bigint,
  p_total_items integer
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
    (org_id, name, category_ids, estimated_cost_cents, budget_cap_cents, total_items, created_by)
  values
    (p_org_id, p_name, p_category_ids, p_estimated_cost_cents, s.budget_cap_cents, p_total_items,
     p_created_by)
  returning * into r;
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

-- A page of an org's runs, newest first, with the org's total, in one round trip.
create function public.collection_list_runs(p_org_id uuid, p_limit integer, p_offset integer)
returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object(
    'total', (select count(*) from public.collection_runs where org_id = p_org_id),
    'runs', coalesce((
      select jsonb_agg(to_jsonb(page) order by page.created_at desc, page.id desc)
        from (select * from public.collection_runs
               where org_id = p_org_id
               order by created_at desc, id desc
               limit p_limit offset p_offset) page
    ), '[]'::jsonb)
  )
$$;

-- One guarded, conditional UPDATE per transition: of two racing transitions exactly one matches.
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
                             else run.completed_at end
    from public.collection_run_transitions t
   where run.id = p_run_id
     and run.org_id = p_org_id
     and t.action = p_action
     and t.from_status = run.status
  returning run.* into r;

  if found then
    return r;
  end if;

  select status into current_status
    from public.collection_runs where id = p_run_id and org_id = p_org_id;
  if not found then
    raise exception 'run not found' using errcode = 'CR003';
  end if;
  raise exception 'cannot % a run that is %', p_action, current_status
    using errcode = 'CR004',
          detail = json_build_object('action', p_action, 'status', current_status)::text;
end
$$;

-- Record one unit of work: the step (idempotency key), the run's counters, actual cost and
-- checkpoint, atomically. Recording the same step twice changes nothing the second time.
create function public.collection_checkpoint(
  p_org_id uuid,
  p_run_id uuid,
  p_step_key text,
  p_checkpoint jsonb,
  p_processed_delta integer default 0,
  p_failed_delta integer default 0,
  p_cost_cents bigint default 0
)
returns public.collection_runs
language plpgsql
set search_path = ''
as $$
declare
  r public.collection_runs;
  recorded boolean;
begin
  select * into r from public.collection_runs
   where id = p_run_id and org_id = p_org_id
   for update;
  if not found then
    raise exception 'run not found' using errcode = 'CR003';
  end if;
  -- Work in flight when a run was paused or cancelled still lands; finished runs take no more.
  if r.status not in ('running', 'paused', 'cancelled') then
    raise exception 'cannot checkpoint a run that is %', r.status
      using errcode = 'CR004',
            detail = json_build_object('action', 'checkpoint', 'status', r.status)::text;
  end if;

  insert into public.collection_run_steps
    (run_id, step_key, processed_delta, failed_delta, cost_cents)
  values (p_run_id, p_step_key, p_processed_delta, p_failed_delta, p_cost_cents)
  on conflict (run_id, step_key) do nothing
  returning true into recorded;

  if recorded then
    update public.collection_runs
       set processed_items = processed_items + p_processed_delta,
           failed_items = failed_items + p_failed_delta,
           actual_cost_cents = actual_cost_cents + p_cost_cents,
           checkpoint = p_checkpoint
     where id = p_run_id
    returning * into r;
  end if;
  return r;
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
alter table public.collection_run_events enable row level security;
alter table public.collection_run_transitions enable row level security;
alter table public.collection_run_steps enable row level security;

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

create policy "members read their org run steps" on public.collection_run_steps
  for select to authenticated
  using (run_id in (select r.id from public.collection_runs r)); -- runs' own policy narrows this

-- Grants: reads for signed-in members (narrowed by the policies), nothing for anon, and the
-- functions only for service_role (and the owner this service connects as).
revoke all on public.organizations, public.roles, public.role_permissions, public.memberships,
  public.collection_settings, public.collection_runs, public.collection_run_events,
  public.collection_run_transitions, public.collection_run_steps from anon, authenticated;
grant select on public.organizations, public.roles, public.role_permissions, public.memberships,
  public.collection_settings, public.collection_runs, public.collection_run_events,
  public.collection_run_transitions, public.collection_run_steps to authenticated;
grant all on public.organizations, public.roles, public.role_permissions, public.memberships,
  public.collection_settings, public.collection_runs, public.collection_run_events,
  public.collection_run_transitions, public.collection_run_steps to service_role;

revoke execute on function
  public.collection_get_settings(uuid),
  public.collection_update_settings(uuid, bigint, integer, integer),
  public.collection_create_run(uuid, uuid, text, text[], bigint, integer),
  public.collection_get_run(uuid, uuid),
  public.collection_list_runs(uuid, integer, integer),
  public.collection_transition_run(uuid, uuid, text, uuid, text),
  public.collection_checkpoint(uuid, uuid, text, jsonb, integer, integer, bigint),
  public.collection_incomplete_runs(integer),
  public.collection_user_access(uuid)
from public, anon, authenticated;
grant execute on function
  public.collection_get_settings(uuid),
  public.collection_update_settings(uuid, bigint, integer, integer),
  public.collection_create_run(uuid, uuid, text, text[], bigint, integer),
  public.collection_get_run(uuid, uuid),
  public.collection_list_runs(uuid, integer, integer),
  public.collection_transition_run(uuid, uuid, text, uuid, text),
  public.collection_checkpoint(uuid, uuid, text, jsonb, integer, integer, bigint),
  public.collection_incomplete_runs(integer),
  public.collection_user_access(uuid)
to service_role;
