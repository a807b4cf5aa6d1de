#!/usr/bin/env python3
# CPU attribution for a steady-state pair (bench/notes.md, verification analytics): runs pgbench
# with 2 clients for 200 s on a running cluster (PGOPTIONS as given), reads every process's CPU
# from /proc each second, and prints for the last 60 s: tps, CPU seconds per process class
# (backends, pgbench, the pg_apikeys writer, autovacuum, ...) and /proc/stat shares.
# pgbench's own CPU per transaction is a control: its work does not depend on the server, so a
# change in it means the machine ran slower, not the server.
# The last line, `summary TPS SERVER_US PGBENCH_US`, is for scripts/bench.sh: tps, and the CPU µs
# per transaction of every postgres process (backends and background work alike) and of pgbench.
# Usage: bench/attribute.py LABEL PGOPTIONS   (e.g. off "-c apikeys.analytics=off", on "")
# Env: SOCKET_DIR (default /tmp/pg_apikeys_bench_default), PORT (55440), DB (app),
#      SCRIPT (bench/verify_key_100k.pgbench), PGBIN (/usr/lib/postgresql/15/bin), CLIENTS (2).
import os, subprocess, sys, time, collections, re
label, pgopts = sys.argv[1], sys.argv[2]
SOCKET_DIR = os.environ.get('SOCKET_DIR', '/tmp/pg_apikeys_bench_default')
PORT = os.environ.get('PORT', '55440')
DB = os.environ.get('DB', 'app')
SCRIPT = os.environ.get('SCRIPT', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'verify_key_100k.pgbench'))
PGBIN = os.environ.get('PGBIN', '/usr/lib/postgresql/15/bin')
CLIENTS = os.environ.get('CLIENTS', '2')
HZ = os.sysconf('SC_CLK_TCK')
def procs():
    out = {}
    for p in os.listdir('/proc'):
        if not p.isdigit(): continue
        try:
            st = open(f'/proc/{p}/stat').read()
            cmd = open(f'/proc/{p}/cmdline').read().replace('\0', ' ').strip()
        except OSError: continue
        f = st[st.rfind(')') + 2:].split()
        out[int(p)] = (int(f[11]) + int(f[12]), cmd)
    return out
def cls(cmd):
    if cmd.startswith('postgres: '):
        c = cmd[10:]
        if f' {DB} ' in c: return 'backend'
        for k in ('autovacuum', 'checkpointer', 'walwriter', 'background writer', 'pg_apikeys'):
            if k in c: return k
        return 'pg other: ' + c[:30]
    if 'pgbench' in cmd: return 'pgbench'
    return 'other'
def stat():
    f = open('/proc/stat').readline().split()[1:]
    return list(map(int, f))
env = dict(os.environ, PGOPTIONS=pgopts)
pb = subprocess.Popen([os.path.join(PGBIN, 'pgbench'), '-h', SOCKET_DIR, '-p', PORT,
    '-U', 'postgres', '-n', '-M', 'prepared', '-c', CLIENTS, '-j', CLIENTS, '-T', '200', '-P', '10',
    '-f', SCRIPT, DB], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
t0 = time.time()
first, last, names = {}, {}, {}
s0 = s1 = None
while pb.poll() is None:
    now = time.time() - t0
    if now >= 140:
        ps = procs()
        if s0 is None: s0 = stat(); base = ps; t_start = now
        for pid, (ticks, cmd) in ps.items():
            if pid not in first: first[pid] = base[pid][0] if pid in base else 0
            # A process that has exited but not been reaped has an empty cmdline: keep its name.
            last[pid] = ticks
            if cmd: names[pid] = cmd
        s1 = stat(); t_end = now
    time.sleep(0.5)
err = pb.stderr.read()
if s0 is None:
    sys.exit(f'pgbench ended before the 140 s window:\n{err}')
tps = [float(m.group(2)) for m in re.finditer(r'progress: (\d+\.\d) s, (\d+\.\d) tps', err) if float(m.group(1)) > 140]
byc = collections.Counter()
for pid in last:
    byc[cls(names.get(pid, ''))] += (last[pid] - first[pid]) / HZ
d = [b - a for a, b in zip(s0, s1)]
tot = sum(d)
print(f"{label}: tps {sum(tps)/len(tps):.0f} ({' '.join('%.0f' % t for t in tps)})")
calls = sum(tps) / len(tps) * (t_end - t_start)
print(f"   µs per call: backend {1e6 * byc['backend'] / calls:.1f}, pgbench {1e6 * byc['pgbench'] / calls:.2f}")
print("   cpu s: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(byc.items(), key=lambda x: -x[1]) if v >= 0.05))
server = sum(v for k, v in byc.items() if k not in ('pgbench', 'other'))
print(f"   /proc/stat %: user {100*d[0]/tot:.1f} sys {100*d[2]/tot:.1f} idle {100*d[3]/tot:.1f} iowait {100*d[4]/tot:.1f} steal {100*d[7]/tot:.1f}")
print(f"summary {sum(tps)/len(tps):.0f} {1e6 * server / calls:.2f} {1e6 * byc['pgbench'] / calls:.3f}")
