"""What `restic dump | pg_restore --create --schema-only --file=-` prints and says, and a stand-in for its run."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from watcher.execute import Command, Completed

# The shape of pg_restore 15/17 output (trimmed), with awkward names and literals.
PG_RESTORE_TEXT = '''--
-- PostgreSQL database dump
--

\\restrict abc

SET statement_timeout = 0;

--
-- Name: My DB; Type: DATABASE; Schema: -; Owner: owner_r
--

CREATE DATABASE "My DB" WITH TEMPLATE = template0 ENCODING = 'UTF8';


ALTER DATABASE "My DB" OWNER TO owner_r;

\\unrestrict abc
\\connect -reuse-previous=on "dbname='My DB'"
\\restrict abc

SET statement_timeout = 0;

--
-- Name: DATABASE "My DB"; Type: COMMENT; Schema: -; Owner: owner_r
--

COMMENT ON DATABASE "My DB" IS 'see DATABASE "My DB";
-- not a header
done';


--
-- Name: My DB; Type: DATABASE PROPERTIES; Schema: -; Owner: owner_r
--

ALTER DATABASE "My DB" SET search_path TO 'app', 'public';
ALTER DATABASE "My DB" SET "TimeZone" TO 'Asia/Tokyo';
ALTER ROLE "x IN DATABASE ""My DB""" IN DATABASE "My DB" SET work_mem TO '8MB';


\\unrestrict abc
\\connect -reuse-previous=on "dbname='My DB'"
\\restrict abc

--
-- Name: t; Type: TABLE; Schema: public; Owner: app
--

CREATE TABLE public.t (x integer);


--
-- Name: TABLE t; Type: ACL; Schema: public; Owner: app
--

GRANT SELECT ON TABLE public.t TO reader;


--
-- Name: DEFAULT PRIVILEGES FOR TABLES; Type: DEFAULT ACL; Schema: public; Owner: owner_r
--

ALTER DEFAULT PRIVILEGES FOR ROLE owner_r IN SCHEMA public GRANT SELECT ON TABLES TO "default reader";


--
-- Name: t p; Type: POLICY; Schema: public; Owner: app
--

CREATE POLICY p ON public.t FOR SELECT TO policy_role USING ((x > 0));


--
-- Name: DATABASE "My DB"; Type: ACL; Schema: -; Owner: owner_r
--

REVOKE CONNECT,TEMPORARY ON DATABASE "My DB" FROM PUBLIC;
GRANT CONNECT ON DATABASE "My DB" TO ro;


--
-- PostgreSQL database dump complete
--

\\unrestrict abc
'''

# How a restic that handles SIGPIPE itself ends a dump into a closed pipe (Go's EPIPE error; restic 0.18 dies of
# SIGPIPE instead, -13).
RESTIC_CUT_OFF = "Fatal: cannot dump file: write /dev/stdout: broken pipe"
PG_RESTORE_CUT_SHORT = ("pg_restore: error: could not read from input file: end of file\n"
                        "backup-watcher: pg_restore in c0ffee exited with status 1")


class FakePipeline:
    """Stands in for run_pipeline: prints `text` line by line and ends with `codes` and `stderr`."""

    def __init__(self, codes: tuple[int, int], stderr: str = "", text: str = PG_RESTORE_TEXT) -> None:
        self.codes, self.stderr, self.text = codes, stderr, text
        self.argv: list[Sequence[Command]] = []

    def __call__(self, argv: Sequence[Command], *, on_stdout_line: Callable[[str], None] | None = None,
                 **_: object) -> Completed:
        self.argv.append(argv)
        for line in self.text.splitlines():
            assert on_stdout_line is not None
            on_stdout_line(line)
        return Completed(tuple(argv), self.codes, stderr_tail=self.stderr)
