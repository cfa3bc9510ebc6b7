-- Local development data only: applied by `make run` / `collection-api migrate` (local mode) to the
-- embedded Postgres (and by `supabase db reset` on a local Supabase stack), never by `db push`.
insert into auth.users (id, email)
values ('00000000-0000-4000-8000-000000000001', 'admin@local.test')
on conflict (id) do nothing;

insert into public.organizations (id, slug, name)
values ('00000000-0000-4000-8000-0000000000a1', 'local', 'Local organisation')
on conflict (id) do nothing;

insert into public.memberships (user_id, org_id, role)
values ('00000000-0000-4000-8000-000000000001', '00000000-0000-4000-8000-0000000000a1', 'admin')
on conflict (user_id, org_id) do nothing;
