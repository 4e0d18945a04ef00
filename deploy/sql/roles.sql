-- cms-ingest database roles: the migrator, the daemon and the operators' software.
--
-- Run by a superuser connected to the cms-ingest database, before the first migration and
-- again after every `cms-ingest migrate` (it is idempotent: running it twice changes nothing):
--
--     psql -v ON_ERROR_STOP=1 -d cms -f deploy/sql/roles.sql
--
-- Roles are cluster-wide; everything else here applies to the current database only.
-- No passwords here: set them afterwards, e.g. in psql `\password cms_daemon`, or
-- `ALTER ROLE cms_daemon PASSWORD '...'` (the statement, password included, may end up in the
-- server log and psql history; `\password` sends only the hash).
--
--   cms_migrator  LOGIN; CREATE on schema public; owns every table, sequence and function the
--                 migrations create (DDL). Used only by `cms-ingest migrate`.
--   cms_daemon    LOGIN; SELECT, INSERT, UPDATE, DELETE on every table the migrator owns and
--                 USAGE, SELECT on its sequences, through default privileges, so tables added by
--                 later migrations are covered without editing this file; SELECT only on
--                 alembic_version. No CREATE, no TRUNCATE, no ownership, no temporary tables.
--   cms_operator  LOGIN; SELECT on alarms, alarm_media, actions; INSERT into actions of the
--                 columns an operator writes (site_id, kind, target, params, requested_by,
--                 not_after); UPDATE of alarms.status only. Nothing else: no DELETE, no
--                 site_state, no alembic_version, no table added later unless granted here.
--
-- The operator's grants name tables the first migration creates: on an empty database they
-- are skipped with a NOTICE, which is why this file is run again after migrating.

BEGIN;

-- ---------------------------------------------------------------------------- the roles
-- Created when missing, never dropped, passwords never touched. Two runs racing on a fresh
-- cluster: the loser of CREATE ROLE sees the winner's role and carries on.
DO $roles$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['cms_migrator', 'cms_daemon', 'cms_operator'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) THEN
            BEGIN
                EXECUTE format(
                    'CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION '
                    'NOBYPASSRLS',
                    name
                );
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
        -- An existing role with more power than it needs is brought back to the model (a
        -- role an administrator set NOLOGIN stays so).
        IF EXISTS (
            SELECT FROM pg_roles
            WHERE rolname = name
              AND (rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls)
        ) THEN
            EXECUTE format(
                'ALTER ROLE %I NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS',
                name
            );
        END IF;
    END LOOP;
END
$roles$;

-- ---------------------------------------------------------------------------- the database
DO $database$
DECLARE
    owner name := (
        SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()
    );
BEGIN
    -- The database owner may create in schema public (PostgreSQL 15: pg_database_owner owns it).
    IF owner IN ('cms_daemon', 'cms_operator') THEN
        RAISE EXCEPTION 'database % is owned by %, which would give it DDL rights',
            current_database(), owner
            USING HINT = 'ALTER DATABASE ' || quote_ident(current_database())
                || ' OWNER TO postgres (or another administrator), then run this file again';
    END IF;
    -- Only our roles (and superusers) connect; nobody creates temporary tables.
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format(
        'GRANT CONNECT ON DATABASE %I TO cms_migrator, cms_daemon, cms_operator',
        current_database()
    );
END
$database$;

-- Before PostgreSQL 15 (and in clusters pg_upgrade'd from one) PUBLIC may create in public.
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO cms_migrator;
GRANT USAGE ON SCHEMA public TO cms_daemon, cms_operator;
REVOKE CREATE ON SCHEMA public FROM cms_daemon, cms_operator;

-- ---------------------------------------------------------------------------- adoption
-- A database migrated before these roles existed (by the daemon as some other user): the
-- owner of alembic_version ran the migrations, so everything it owns in public moves to
-- cms_migrator. Sequences of identity and serial columns follow their tables.
DO $adopt$
DECLARE
    legacy oid := (
        SELECT relowner FROM pg_class
        WHERE oid = to_regclass('public.alembic_version')
    );
    migrator oid := (SELECT oid FROM pg_roles WHERE rolname = 'cms_migrator');
    object record;
BEGIN
    IF legacy IS NULL OR legacy = migrator THEN
        RETURN;
    END IF;
    RAISE NOTICE 'handing the objects of % in schema public over to cms_migrator',
        pg_get_userbyid(legacy);
    FOR object IN
        SELECT c.oid::regclass AS name, c.relkind
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace
          AND c.relowner = legacy
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
          AND NOT EXISTS (  -- a column's own sequence moves with its table
              SELECT FROM pg_depend d
              WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                AND d.deptype IN ('a', 'i')
          )
    LOOP
        EXECUTE format(
            'ALTER %s %s OWNER TO cms_migrator',
            CASE object.relkind
                WHEN 'v' THEN 'VIEW'
                WHEN 'm' THEN 'MATERIALIZED VIEW'
                WHEN 'f' THEN 'FOREIGN TABLE'
                WHEN 'S' THEN 'SEQUENCE'
                ELSE 'TABLE'
            END,
            object.name
        );
    END LOOP;
    FOR object IN
        SELECT p.oid::regprocedure AS name, p.prokind
        FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace AND p.proowner = legacy
    LOOP
        EXECUTE format(
            'ALTER %s %s OWNER TO cms_migrator',
            CASE object.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE'
                ELSE 'FUNCTION' END,
            object.name
        );
    END LOOP;
    FOR object IN
        SELECT t.oid::regtype AS name
        FROM pg_type t
        WHERE t.typnamespace = 'public'::regnamespace AND t.typowner = legacy
          AND t.typtype IN ('e', 'd', 'r', 'm')  -- enums, domains, ranges (not row types)
          AND NOT EXISTS (  -- a range's multirange moves with its range
              SELECT FROM pg_range r WHERE r.rngmultitypid = t.oid
          )
    LOOP
        EXECUTE format('ALTER TYPE %s OWNER TO cms_migrator', object.name);
    END LOOP;
END
$adopt$;

-- ---------------------------------------------------------------------------- the daemon
-- Every table and sequence the migrator creates from now on.
ALTER DEFAULT PRIVILEGES FOR ROLE cms_migrator IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO cms_daemon;
ALTER DEFAULT PRIVILEGES FOR ROLE cms_migrator IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO cms_daemon;

-- And those it owns already (exactly these privileges: anything broader is taken back).
DO $daemon$
DECLARE
    object record;
BEGIN
    FOR object IN
        SELECT c.oid::regclass AS name, c.relkind
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace
          AND c.relowner = (SELECT oid FROM pg_roles WHERE rolname = 'cms_migrator')
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
    LOOP
        IF object.relkind = 'S' THEN
            EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM cms_daemon', object.name);
            EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO cms_daemon', object.name);
            CONTINUE;
        END IF;
        EXECUTE format('REVOKE ALL ON TABLE %s FROM cms_daemon', object.name);
        IF object.name = to_regclass('public.alembic_version') THEN
            -- Read at start to check the schema is current; only the migrator moves it.
            EXECUTE format('GRANT SELECT ON TABLE %s TO cms_daemon', object.name);
        ELSE
            EXECUTE format(
                'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE %s TO cms_daemon', object.name
            );
        END IF;
    END LOOP;
END
$daemon$;

-- ---------------------------------------------------------------------------- the operator
DO $operator$
DECLARE
    object record;
BEGIN
    -- Whatever it was given before, on any table of the schema, is taken back first.
    FOR object IN
        SELECT c.oid::regclass AS name, c.relkind
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
    LOOP
        EXECUTE format(
            'REVOKE ALL ON %s %s FROM cms_operator',
            CASE object.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
            object.name
        );
    END LOOP;
    IF to_regclass('public.alarms') IS NULL
        OR to_regclass('public.alarm_media') IS NULL
        OR to_regclass('public.actions') IS NULL
    THEN
        RAISE NOTICE 'cms_operator: the tables do not exist yet; run this file again after '
            '`cms-ingest migrate`';
        RETURN;
    END IF;
    GRANT SELECT ON public.alarms, public.alarm_media, public.actions TO cms_operator;
    GRANT UPDATE (status) ON public.alarms TO cms_operator;
    GRANT INSERT (site_id, kind, target, params, requested_by, not_after)
        ON public.actions TO cms_operator;
END
$operator$;

COMMIT;
