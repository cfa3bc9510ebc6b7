-- The collection executor (plan 07): items, categories, sellers, category history, leases and the
-- live budget. Every write the executor makes goes through a function below that is fenced by the
-- run's lease token, so a process that lost its lease cannot write.
--
-- Money: actual_cost_cents is what the provider has (or may have) charged: known charges plus
-- uncertain ones (reservations a dead process left behind, moved into actual_cost_cents and
-- uncertain_cost_cents when its runs are taken over). reserved_cents covers calls in flight.
-- actual_cost_cents + reserved_cents never passes budget_cap_cents (a CHECK, so no path can).
--
-- New error: CR005 lease lost (the caller no longer holds the run).

alter table public.collection_runs
  add column provider text not null default 'sandbox' check (provider in ('sandbox', 'oxylabs')),
  add column status_message text,
  add column status_reason text,
  add column lease_owner text,
  add column lease_token uuid,
  add column lease_expires_at timestamptz,
  add column reserved_cents bigint not null default 0 check (reserved_cents >= 0),
  add column uncertain_cost_cents bigint not null default 0 check (uncertain_cost_cents >= 0),
  add constraint collection_runs_within_cap check (actual_cost_cents + reserved_cents <= budget_cap_cents),
  add constraint collection_runs_uncertain_in_actual check (uncertain_cost_cents <= actual_cost_cents);

-- Claiming: running runs whose lease is free, expired or left by an earlier process of the same worker.
create index collection_runs_claimable_idx on public.collection_runs (started_at, id)
  where status = 'running';
create index collection_runs_lease_token_idx on public.collection_runs (lease_token)
  where lease_token is not null;

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

-- Runs created before this migration get their categories too.
insert into public.collection_run_categories (run_id, position, category_id)
select r.id, o.n, o.c from public.collection_runs r, unnest(r.category_ids) with ordinality as o(c, n);

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
create index collection_run_items_listing_idx on public.collection_run_items (run_id, status, category_id, position);

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

-- What past runs observed per category: the estimate learns from it.
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
-- Transitions now also record why (status_reason) and refresh the run's cap from the org's settings
-- when it (re)starts, so raising the cap and resuming lets a budget-paused run go on. The cap never
-- drops below what the run has already spent or reserved.
-- ---------------------------------------------------------------------------------------------------
create or replace function public.collection_transition_run(
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
  -- Lock the row first and decide from the status it has now: a transition queued behind another
  -- is judged on the status the first one left (an UPDATE joined to the transitions table would
  -- re-check the run row but keep the transition row it matched before it waited).
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

create or replace function public.collection_create_run(
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
drop function public.collection_create_run(uuid, uuid, text, text[], bigint, integer);

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
-- Leases
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

-- ---------------------------------------------------------------------------------------------------
-- Live budget
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
-- Checkpoints of the executor: one atomic, fenced, idempotent statement per unit of work.
-- ---------------------------------------------------------------------------------------------------

-- A category's products were discovered (or discovery failed: p_error, no products).
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
  if cat.discovered_at is not null then
    -- Recorded before (a retry after a lost answer): the money was still spent.
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
-- sellers it found, in one statement. An item is counted once: only its first record moves the counters.
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
    -- Already recorded: keep the money honest, move nothing else.
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
-- pending; 'fail' with a reason. Releases the lease. Returns null when 'complete' is premature.
create function public.collection_finish_run(p_run_id uuid, p_token uuid, p_action text, p_reason text)
returns public.collection_runs
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
    return null;
  end if;
  r := public.collection_transition_run(r.org_id, p_run_id, p_action, null, p_reason);
  update public.collection_runs
     set status_message = case p_action
           when 'complete' then format('Completed: %s products, %s failed', processed_items, failed_items)
           else format('Failed: %s', p_reason) end
   where id = p_run_id;
  perform public.collection_release_run(p_run_id, p_token);
  select * into r from public.collection_runs where id = p_run_id;
  return r;
end
$$;

-- ---------------------------------------------------------------------------------------------------
-- Reads
-- ---------------------------------------------------------------------------------------------------
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

-- Events after a given id, for the progress stream.
create function public.collection_run_events_since(p_org_id uuid, p_run_id uuid, p_after_id bigint)
returns setof public.collection_run_events
language sql stable
set search_path = ''
as $$
  select * from public.collection_run_events
   where run_id = p_run_id and org_id = p_org_id and id > p_after_id
   order by id
$$;

-- ---------------------------------------------------------------------------------------------------
-- RLS and grants
-- ---------------------------------------------------------------------------------------------------
alter table public.collection_run_categories enable row level security;
alter table public.collection_run_items enable row level security;
alter table public.collection_sellers enable row level security;
alter table public.collection_category_stats enable row level security;

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

revoke all on public.collection_run_categories, public.collection_run_items, public.collection_sellers,
  public.collection_category_stats from anon, authenticated;
grant select on public.collection_run_categories, public.collection_run_items, public.collection_sellers,
  public.collection_category_stats to authenticated;
grant all on public.collection_run_categories, public.collection_run_items, public.collection_sellers,
  public.collection_category_stats to service_role;

-- Every function in public is ours and only for this service: none for anon or authenticated (Supabase's
-- default privileges would grant them), all for service_role. Later migrations repeat this line.
revoke execute on all functions in schema public from public, anon, authenticated;
grant execute on all functions in schema public to service_role;
