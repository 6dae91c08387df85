/* seedboot-agent: embeds CPython and runs seedboot.agent.main:main().
 *
 * Why not the python binary: argv[0] must be free (the block daemon runs as "@seedboot-blockdev"),
 * the runtime must be found without PATH or environment, and start-up must skip site, getpath's
 * probing and environment lookups (each file system probe costs under emulation).
 * The runtime sits next to this file: lib/ (shared libraries, found through RPATH $ORIGIN/lib)
 * and python/ (sourceless .pyc and extension modules). See initramfs/README.md.
 * Its ELF interpreter is /run/seedboot/lib/ld-linux-x86-64.so.2 (set at link time), so it also
 * starts in a booted root without glibc, or with another glibc whose loader would not match.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

static const char RUN[] =
    "import sys\n"
    "from seedboot.agent.main import main\n"
    "sys.exit(main())\n";

static void fail(const char *what, PyStatus status) {
    fprintf(stderr, "seedboot-agent: %s: %s\n", what, status.err_msg ? status.err_msg : "failed");
    Py_ExitStatusException(status);
}

int main(int argc, char **argv) {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) {
        perror("seedboot-agent: readlink /proc/self/exe (is /proc mounted?)");
        return 127;
    }
    exe[n] = '\0';
    /* Started through the loader ("lib/ld-linux-x86-64.so.2 seedboot-agent ..."): the program
     * is argv[0], not /proc/self/exe. */
    const char *base = strrchr(exe, '/');
    if (base != NULL && strncmp(base + 1, "ld-linux", 8) == 0 && argc > 0 &&
        realpath(argv[0], exe) == NULL) {
        perror("seedboot-agent: realpath argv[0]");
        return 127;
    }
    n = (ssize_t)strlen(exe);
    char home[PATH_MAX];
    memcpy(home, exe, (size_t)n + 1);
    char *slash = strrchr(home, '/');
    if (slash == NULL) return 127;
    *slash = '\0';
    char path[PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/python", home);

    PyStatus status;
    PyPreConfig pre;
    PyPreConfig_InitIsolatedConfig(&pre);
    pre.utf8_mode = 1; /* the initramfs has no locale */
    status = Py_PreInitialize(&pre);
    if (PyStatus_Exception(status)) fail("pre-initialize", status);

    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    config.site_import = 0;
    config.write_bytecode = 0;
    config.buffered_stdio = 0; /* console lines must appear at once */
    config.optimization_level = 2;
    config.pathconfig_warnings = 0;
    config.parse_argv = 0; /* sys.argv is argv exactly, argv[0] included */
    config.module_search_paths_set = 1;
    /* Python's hash seed comes from /dev/urandom, and at early boot, on a CPU without RDRAND
     * (QEMU's default qemu64), the kernel makes a read of /dev/urandom wait until its CRNG is
     * seeded: 1-1.5 s of jitter sampling under emulation before the agent's first line. The
     * seed only randomizes dict hashing, so take what the CRNG has now (GRND_INSECURE, never
     * blocks; kernel 5.6+) and fall back on the clock. 0 would turn randomization off. */
    unsigned long seed = 0;
    if (getrandom(&seed, sizeof seed, 0x0004 /* GRND_INSECURE */) != (ssize_t)sizeof seed)
        seed = (unsigned long)time(NULL) ^ ((unsigned long)getpid() << 16);
    config.use_hash_seed = 1;
    config.hash_seed = seed % 4294967295UL + 1;
    /* "seedinit.importtime" on the kernel command line: python -X importtime, to find what makes
     * the agent (PID 1) or the block daemon ("@...") slow to start under emulation; the environment
     * is ignored, so this is the switch. */
    FILE *cmdline = getpid() == 1 || argv[0][0] == '@' ? fopen("/proc/cmdline", "r") : NULL;
    if (cmdline != NULL) {
        char line[4096];
        size_t got = fread(line, 1, sizeof line - 1, cmdline);
        line[got] = '\0';
        fclose(cmdline);
        if (strstr(line, "seedinit.importtime") != NULL) config.import_time = 1;
    }
#define CHECK(what, call)                                  \
    do {                                                   \
        status = (call);                                   \
        if (PyStatus_Exception(status)) fail(what, status); \
    } while (0)
    CHECK("home", PyConfig_SetBytesString(&config, &config.home, home));
    CHECK("prefix", PyConfig_SetBytesString(&config, &config.prefix, home));
    CHECK("exec_prefix", PyConfig_SetBytesString(&config, &config.exec_prefix, home));
    CHECK("base_prefix", PyConfig_SetBytesString(&config, &config.base_prefix, home));
    CHECK("base_exec_prefix", PyConfig_SetBytesString(&config, &config.base_exec_prefix, home));
    CHECK("executable", PyConfig_SetBytesString(&config, &config.executable, exe));
    CHECK("base_executable", PyConfig_SetBytesString(&config, &config.base_executable, exe));
    CHECK("platlibdir", PyConfig_SetBytesString(&config, &config.platlibdir, "lib"));
    CHECK("stdlib_dir", PyConfig_SetBytesString(&config, &config.stdlib_dir, path));
    CHECK("argv", PyConfig_SetBytesArgv(&config, argc, argv));
    wchar_t *wpath = Py_DecodeLocale(path, NULL);
    if (wpath == NULL) return 127;
    CHECK("path", PyWideStringList_Append(&config.module_search_paths, wpath));
    PyMem_RawFree(wpath);
    CHECK("initialize", Py_InitializeFromConfig(&config));
    PyConfig_Clear(&config);
    /* SystemExit inside is handled by Python: it exits with the status given. */
    int rc = PyRun_SimpleString(RUN);
    if (Py_FinalizeEx() < 0) return 120;
    return rc == 0 ? 0 : 1;
}
