/*
 * hostmem: a minimal drm-pagemap backend in C, written against include/drm_pagemap_plugin.h
 * alone. Its "devices" are arenas of host memory; addresses are plain pointers; copies are
 * memcpy in the calling thread, each returning a host fence
 * made through the host services; a copy behind a pending pre-fence is deferred to the host's
 * fence worker (on_signal), so no call blocks. It shows the ABI is usable without Rust.
 *
 * Build: cc -shared -fPIC -I include -o libdrm_pagemap_plugin_hostmem.so hostmem.c -lpthread
 *
 * Options (keys under "hostmem."):
 *   hostmem.fail=ENTRY   every call of ENTRY fails with DPP_E_DRIVER (testing): one of open,
 *                        host_memory, create_pagemap, device_map, allocate,
 *                        populate_devmem_pfn, copy_to_devmem, copy_to_ram, alloc_frames,
 *                        map_frames, read, write, zero
 *   hostmem.hang=1       copies return a fence that never signals (testing timeouts)
 *
 * Test variants (compile-time): DPP_TEST_VERSION=N (table says ABI version N),
 * DPP_TEST_TRUNCATED (struct_size too small), DPP_TEST_NULL_OPEN (required entry NULL),
 * DPP_TEST_NO_ENTRY (no entry symbol), DPP_TEST_V2_ONLY (only a v2 symbol),
 * DPP_TEST_PROBE_FAIL (probe says no), DPP_TEST_PROBE_PANIC (probe reports a panic),
 * DPP_NAME="..." (another name, so variants can be loaded beside the real one).
 */
#include "drm_pagemap_plugin.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GRANULE 4096ull

#ifndef DPP_NAME
#define DPP_NAME "hostmem"
#endif

static const dpp_host_services *g_host;

/* ---- errors ---------------------------------------------------------------------------- */

static _Thread_local char g_msg[256];

static int32_t fail(dpp_error *e, int32_t kind, const char *msg) {
    snprintf(g_msg, sizeof g_msg, "%s", msg);
    if (e) {
        e->kind = kind;
        e->flags = 0;
        e->driver_code = 0;
        e->api = NULL;
        e->message = g_msg;
    }
    return kind;
}

static int32_t injected(dpp_error *e, const char *entry) {
    snprintf(g_msg, sizeof g_msg, "hostmem: injected failure in %s", entry);
    if (e) {
        e->kind = DPP_E_DRIVER;
        e->flags = 0;
        e->driver_code = -7;
        e->api = "hostmem_inject";
        e->message = g_msg;
    }
    return DPP_E_DRIVER;
}

/* ---- an arena of granules, first fit ----------------------------------------------------- */

typedef struct arena {
    pthread_mutex_t lock;
    uint8_t *mem;
    uint8_t *used;      /* one byte per granule */
    uint64_t granules;
    uint64_t cursor;
} arena;

static int arena_init(arena *a, uint64_t bytes) {
    a->granules = bytes / GRANULE;
    a->mem = calloc(a->granules ? a->granules : 1, GRANULE);
    a->used = calloc(a->granules ? a->granules : 1, 1);
    a->cursor = 0;
    pthread_mutex_init(&a->lock, NULL);
    return a->mem && a->used;
}

static void arena_fini(arena *a) {
    free(a->mem);
    free(a->used);
    pthread_mutex_destroy(&a->lock);
}

/* One aligned run of `len` granules; returns its start or UINT64_MAX. Lock held. */
static uint64_t arena_take(arena *a, uint64_t len) {
    for (uint64_t pass = 0; pass < 2; pass++) {
        uint64_t start = pass ? 0 : a->cursor;
        start = (start + len - 1) / len * len;
        for (uint64_t s = start; s + len <= a->granules; s += len) {
            uint64_t k = 0;
            while (k < len && !a->used[s + k]) k++;
            if (k == len) {
                memset(a->used + s, 1, len);
                a->cursor = s + len;
                return s;
            }
        }
    }
    return UINT64_MAX;
}

/* Frees (and zeroes) runs of `len` granules. Lock held. */
static void arena_give(arena *a, const uint64_t *starts, size_t n, uint64_t len) {
    for (size_t i = 0; i < n; i++) {
        if (starts[i] + len > a->granules) continue;
        memset(a->mem + starts[i] * GRANULE, 0, len * GRANULE);
        memset(a->used + starts[i], 0, len);
    }
}

/* n runs of `len` granules into out; all or nothing. */
static int arena_alloc(arena *a, uint64_t len, uint64_t *out, size_t n) {
    pthread_mutex_lock(&a->lock);
    for (size_t i = 0; i < n; i++) {
        out[i] = arena_take(a, len);
        if (out[i] == UINT64_MAX) {
            arena_give(a, out, i, len);
            pthread_mutex_unlock(&a->lock);
            return 0;
        }
    }
    pthread_mutex_unlock(&a->lock);
    return 1;
}

static void arena_free(arena *a, const uint64_t *starts, size_t n, uint64_t len) {
    pthread_mutex_lock(&a->lock);
    arena_give(a, starts, n, len);
    pthread_mutex_unlock(&a->lock);
}

static int page_ok(uint64_t ps) { return ps == 4096 || ps == 65536 || ps == 2097152; }

/* ---- the backend ------------------------------------------------------------------------- */

typedef struct backend {
    uint32_t devices;
    uint64_t device_capacity;
    arena host;
    char fail[32];
    int hang;
} backend;

typedef struct allocation allocation;

typedef struct pagemap {
    backend *b;
    arena mem;
    uint32_t device;
    uint64_t context;
    uint64_t seqno;
    uint64_t next_id;
    allocation *live;        /* under mem.lock */
    char name[32];
} pagemap;

struct allocation {
    struct allocation *next; /* the pagemap's live allocations */
    uint64_t id;             /* the cookie: never reused */
    uint64_t npages;
    uint64_t page_size;
    uint64_t starts[];   /* granule index of each page */
};

/* Finds (and with `unlink`, removes) the live allocation `id`. */
static allocation *find(pagemap *p, uint64_t id, int unlink) {
    pthread_mutex_lock(&p->mem.lock);
    allocation **at = &p->live;
    while (*at && (*at)->id != id) at = &(*at)->next;
    allocation *a = *at;
    if (a && unlink) *at = a->next;
    pthread_mutex_unlock(&p->mem.lock);
    return a;
}

static int fails(backend *b, const char *entry) { return strcmp(b->fail, entry) == 0; }

/* host memory */

static void hm_destroy(void *obj) { (void)obj; /* owned by the backend */ }

static int32_t hm_alloc_frames(void *obj, uint64_t ps, uint64_t *out, size_t n, dpp_error *e) {
    backend *b = obj;
    if (fails(b, "alloc_frames")) return injected(e, "alloc_frames");
    if (!page_ok(ps)) return fail(e, DPP_E_INVALID_ARGUMENT, "hostmem: bad page size");
    if (!arena_alloc(&b->host, ps / GRANULE, out, n))
        return fail(e, DPP_E_OUT_OF_MEMORY, "hostmem: host memory exhausted");
    return DPP_OK;
}

static void hm_free_frames(void *obj, const uint64_t *frames, size_t n, uint64_t ps) {
    backend *b = obj;
    arena_free(&b->host, frames, n, ps / GRANULE);
}

static int32_t hm_read(void *obj, uint64_t frame, size_t off, uint8_t *buf, size_t len, dpp_error *e) {
    backend *b = obj;
    if (fails(b, "read")) return injected(e, "read");
    if ((frame * GRANULE + off + len) > b->host.granules * GRANULE)
        return fail(e, DPP_E_INVALID_ARGUMENT, "hostmem: read past the host arena");
    memcpy(buf, b->host.mem + frame * GRANULE + off, len);
    return DPP_OK;
}

static int32_t hm_write(void *obj, uint64_t frame, size_t off, const uint8_t *data, size_t len, dpp_error *e) {
    backend *b = obj;
    if (fails(b, "write")) return injected(e, "write");
    if ((frame * GRANULE + off + len) > b->host.granules * GRANULE)
        return fail(e, DPP_E_INVALID_ARGUMENT, "hostmem: write past the host arena");
    memcpy(b->host.mem + frame * GRANULE + off, data, len);
    return DPP_OK;
}

static int32_t hm_zero(void *obj, uint64_t frame, uint64_t ps, dpp_error *e) {
    backend *b = obj;
    if (fails(b, "zero")) return injected(e, "zero");
    if ((frame * GRANULE + ps) > b->host.granules * GRANULE)
        return fail(e, DPP_E_INVALID_ARGUMENT, "hostmem: zero past the host arena");
    memset(b->host.mem + frame * GRANULE, 0, ps);
    return DPP_OK;
}

static int32_t hm_map_frames(void *obj, uint32_t dev, const uint64_t *frames, size_t n, uint64_t ps,
                             uint32_t dir, uint64_t *out, dpp_error *e) {
    backend *b = obj;
    (void)dev; (void)ps; (void)dir;
    if (fails(b, "map_frames")) return injected(e, "map_frames");
    for (size_t i = 0; i < n; i++) out[i] = (uint64_t)(uintptr_t)(b->host.mem + frames[i] * GRANULE);
    return DPP_OK;
}

static void hm_unmap_frames(void *obj, uint32_t dev, const uint64_t *addrs, size_t n, uint64_t ps, uint32_t dir) {
    (void)obj; (void)dev; (void)addrs; (void)n; (void)ps; (void)dir;
}

static uint64_t hm_capacity(void *obj) { return ((backend *)obj)->host.granules * GRANULE; }

static const dpp_host_memory_ops HOST_OPS = {
    sizeof(dpp_host_memory_ops), 0, hm_destroy, hm_alloc_frames, hm_free_frames, hm_read,
    hm_write, hm_zero, hm_map_frames, hm_unmap_frames, hm_capacity,
};

/* pagemaps */

static void pm_destroy(void *obj) {
    pagemap *p = obj;
    arena_fini(&p->mem);
    free(p);
}

static int32_t pm_device_map(void *obj, uint32_t dev, const uint32_t *pfns, size_t n, uint64_t ps,
                             uint32_t dir, uint64_t *out, dpp_error *e) {
    pagemap *p = obj;
    (void)dev; (void)ps; (void)dir;
    if (fails(p->b, "device_map")) return injected(e, "device_map");
    for (size_t i = 0; i < n; i++) out[i] = (uint64_t)(uintptr_t)(p->mem.mem + (uint64_t)pfns[i] * GRANULE);
    return DPP_OK;
}

static void pm_device_unmap(void *obj, uint32_t dev, const uint64_t *addrs, size_t n, uint64_t ps, uint32_t dir) {
    (void)obj; (void)dev; (void)addrs; (void)n; (void)ps; (void)dir;
}

static const dpp_pagemap_ops PAGEMAP_OPS = {
    sizeof(dpp_pagemap_ops), 0, pm_destroy, pm_device_map, pm_device_unmap,
};

static int32_t dm_allocate(void *obj, uint64_t npages, uint64_t ps, dpp_devmem_backing *out, dpp_error *e) {
    pagemap *p = obj;
    if (fails(p->b, "allocate")) return injected(e, "allocate");
    if (!page_ok(ps)) return fail(e, DPP_E_INVALID_ARGUMENT, "hostmem: bad page size");
    if (npages == 0 || npages > p->mem.granules) return fail(e, DPP_E_OUT_OF_MEMORY, "hostmem: device memory exhausted");
    allocation *a = malloc(sizeof *a + npages * sizeof(uint64_t));
    if (!a) return fail(e, DPP_E_OUT_OF_MEMORY, "hostmem: no memory for the allocation record");
    a->npages = npages;
    a->page_size = ps;
    if (!arena_alloc(&p->mem, ps / GRANULE, a->starts, npages)) {
        free(a);
        return fail(e, DPP_E_OUT_OF_MEMORY, "hostmem: device memory exhausted");
    }
    pthread_mutex_lock(&p->mem.lock);
    a->id = ++p->next_id;
    a->next = p->live;
    p->live = a;
    pthread_mutex_unlock(&p->mem.lock);
    out->cookie = a->id;
    out->npages = npages;
    out->page_size = ps;
    out->pre_migrate_fence.obj = NULL; /* freed pages are zeroed at once */
    out->pre_migrate_fence.ops = NULL;
    return DPP_OK;
}

static int32_t dm_populate(void *obj, const dpp_devmem_backing *bk, uint32_t *out, size_t n, dpp_error *e) {
    pagemap *p = obj;
    if (fails(p->b, "populate_devmem_pfn")) return injected(e, "populate_devmem_pfn");
    allocation *a = find(p, bk->cookie, 0);
    if (!a) return fail(e, DPP_E_INVALID_ARGUMENT, "hostmem: no such allocation");
    if (n != a->npages) return fail(e, DPP_E_INVALID_ARGUMENT, "hostmem: pfn buffer size");
    for (size_t i = 0; i < n; i++) out[i] = (uint32_t)a->starts[i];
    return DPP_OK;
}

/* A host fence on the pagemap's timeline; signalled now unless the backend hangs copies. */
static int32_t done_fence(pagemap *p, const dpp_error *err, dpp_fence *out, dpp_error *e) {
    void *signal = NULL;
    uint64_t seq = __atomic_add_fetch(&p->seqno, 1, __ATOMIC_RELAXED);
    int32_t s = g_host->fence_create(g_host->host, p->context, seq, out, &signal);
    if (s != DPP_OK) return fail(e, DPP_E_COPY_FAILED, "hostmem: fence_create failed");
    if (p->b->hang) return DPP_OK; /* testing: the signal handle is never used */
    g_host->fence_signal(g_host->host, signal, err);
    return DPP_OK;
}

static void do_copy(pagemap *p, int to_ram, uint64_t ps, const uint32_t *pages, const uint64_t *addrs, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (addrs[i] == 0) continue;
        uint8_t *dev = p->mem.mem + (uint64_t)pages[i] * GRANULE;
        uint8_t *other = (uint8_t *)(uintptr_t)addrs[i];
        if (to_ram) memcpy(other, dev, ps);
        else memcpy(dev, other, ps);
    }
}

/* A copy deferred behind a pending pre-fence: runs on the host's fence worker. */
typedef struct deferred {
    pagemap *p;
    int to_ram;
    uint64_t ps;
    size_t n;
    uint32_t *pages;
    uint64_t *addrs;
    void *signal;
} deferred;

static void run_deferred(void *user, int32_t status, const dpp_error *err) {
    deferred *d = user;
    (void)err;
    if (status == DPP_OK) {
        do_copy(d->p, d->to_ram, d->ps, d->pages, d->addrs, d->n);
        if (!d->p->b->hang) g_host->fence_signal(g_host->host, d->signal, NULL);
    } else {
        dpp_error fe = {DPP_E_COPY_FAILED, 0, 0, NULL, "hostmem: the pre-fence failed"};
        g_host->fence_signal(g_host->host, d->signal, &fe);
    }
    free(d->pages);
    free(d->addrs);
    free(d);
}

static int32_t copy(pagemap *p, const dpp_copy_request *r, int to_ram, dpp_fence *out, dpp_error *e) {
    if (fails(p->b, to_ram ? "copy_to_ram" : "copy_to_devmem")) return injected(e, to_ram ? "copy_to_ram" : "copy_to_devmem");
    if (!page_ok(r->page_size)) return fail(e, DPP_E_INVALID_ARGUMENT, "hostmem: bad page size");
    if (r->pre_fence && r->pre_fence->obj) {
        dpp_error pe = {0};
        int32_t s = r->pre_fence->ops->status(r->pre_fence->obj, &pe);
        if (s == DPP_PENDING) {
            /* Deferred: no destination byte before the pre-fence signalled, and the call
             * does not block. The request's arrays are borrowed: keep copies. */
            deferred *d = calloc(1, sizeof *d);
            if (!d) return fail(e, DPP_E_OUT_OF_MEMORY, "hostmem: no memory for a deferred copy");
            d->p = p;
            d->to_ram = to_ram;
            d->ps = r->page_size;
            d->n = r->count;
            d->pages = malloc(r->count * sizeof *d->pages + 1);
            d->addrs = malloc(r->count * sizeof *d->addrs + 1);
            if (!d->pages || !d->addrs) {
                free(d->pages);
                free(d->addrs);
                free(d);
                return fail(e, DPP_E_OUT_OF_MEMORY, "hostmem: no memory for a deferred copy");
            }
            memcpy(d->pages, r->pages, r->count * sizeof *d->pages);
            memcpy(d->addrs, r->addrs, r->count * sizeof *d->addrs);
            uint64_t seq = __atomic_add_fetch(&p->seqno, 1, __ATOMIC_RELAXED);
            if (g_host->fence_create(g_host->host, p->context, seq, out, &d->signal) != DPP_OK) {
                free(d->pages);
                free(d->addrs);
                free(d);
                return fail(e, DPP_E_COPY_FAILED, "hostmem: fence_create failed");
            }
            if (g_host->on_signal(g_host->host, r->pre_fence, run_deferred, d) != DPP_OK) {
                dpp_error fe = {DPP_E_COPY_FAILED, 0, 0, NULL, "hostmem: on_signal refused the pre-fence"};
                g_host->fence_signal(g_host->host, d->signal, &fe);
                free(d->pages);
                free(d->addrs);
                free(d);
            }
            return DPP_OK;
        }
        if (s != DPP_OK) {
            dpp_error fe = {DPP_E_COPY_FAILED, 0, 0, NULL, "hostmem: the pre-fence failed"};
            return done_fence(p, &fe, out, e);
        }
    }
    do_copy(p, to_ram, r->page_size, r->pages, r->addrs, r->count);
    return done_fence(p, NULL, out, e);
}

static int32_t dm_copy_to_devmem(void *obj, const dpp_copy_request *r, dpp_fence *out, dpp_error *e) {
    return copy(obj, r, 0, out, e);
}

static int32_t dm_copy_to_ram(void *obj, const dpp_copy_request *r, dpp_fence *out, dpp_error *e) {
    return copy(obj, r, 1, out, e);
}

static void dm_release(void *obj, const dpp_devmem_backing *bk) {
    pagemap *p = obj;
    allocation *a = find(p, bk->cookie, 1);
    if (!a) return;
    arena_free(&p->mem, a->starts, a->npages, a->page_size / GRANULE);
    free(a);
}

static uint64_t dm_capacity(void *obj) { return ((pagemap *)obj)->mem.granules * GRANULE; }

static void dm_caps(void *obj, dpp_copy_caps *out) {
    (void)obj;
    memset(out, 0, sizeof *out);
    out->host_fences = 2; /* deferred behind a pending pre-fence (on the host's worker) */
    out->in_order = 0;    /* a deferred copy may run after a later one */
}

static const dpp_devmem_ops DEVMEM_OPS = {
    sizeof(dpp_devmem_ops), 0, dm_allocate, dm_populate, dm_copy_to_devmem, dm_copy_to_ram,
    dm_release, NULL /* release_many: default */, NULL /* release_unused: default */,
    dm_capacity, dm_caps,
};

/* backend */

static void be_destroy(void *obj) {
    backend *b = obj;
    arena_fini(&b->host);
    free(b);
}

static uint32_t be_device_count(void *obj) { return ((backend *)obj)->devices; }

static int32_t be_device_info(void *obj, uint32_t index, dpp_device_info *out) {
    backend *b = obj;
    if (index >= b->devices) return DPP_E_INVALID_ARGUMENT;
    memset(out, 0, sizeof *out);
    out->id = index;
    int n = snprintf(out->name, sizeof out->name, "hostmem %u", index);
    out->name_len = (uint8_t)(n < 0 ? 0 : n);
    out->memory_bytes = b->device_capacity;
    return DPP_OK;
}

static int32_t be_host_memory(void *obj, dpp_host_memory *out, dpp_error *e) {
    backend *b = obj;
    if (fails(b, "host_memory")) return injected(e, "host_memory");
    out->obj = b;
    out->ops = &HOST_OPS;
    return DPP_OK;
}

static int32_t be_create_pagemap(void *obj, const dpp_pagemap_spec *spec, dpp_pagemap *out, dpp_error *e) {
    backend *b = obj;
    if (fails(b, "create_pagemap")) return injected(e, "create_pagemap");
    if (spec->device >= b->devices) {
        char msg[96];
        snprintf(msg, sizeof msg, "hostmem: device %" PRIu32 " does not exist (%" PRIu32 " devices)",
                 spec->device, b->devices);
        return fail(e, DPP_E_BAD_CONFIG, msg);
    }
    pagemap *p = calloc(1, sizeof *p);
    if (!p) return fail(e, DPP_E_OUT_OF_MEMORY, "hostmem: no memory for the pagemap");
    uint64_t cap = spec->capacity_bytes < b->device_capacity ? spec->capacity_bytes : b->device_capacity;
    if (!arena_init(&p->mem, cap)) {
        arena_fini(&p->mem);
        free(p);
        return fail(e, DPP_E_OUT_OF_MEMORY, "hostmem: device arena");
    }
    p->b = b;
    p->device = spec->device;
    p->context = g_host->reserve_fence_contexts(g_host->host, 1);
    snprintf(p->name, sizeof p->name, "hostmem pagemap %u", spec->id);
    out->obj = p;
    out->pagemap_ops = &PAGEMAP_OPS;
    out->devmem_ops = &DEVMEM_OPS;
    out->owner = spec->has_owner ? spec->owner : 0x4000; /* one interconnect */
    out->device = spec->device;
    out->name = p->name;
    return DPP_OK;
}

static int32_t be_can_access_peer(void *obj, uint32_t a, uint32_t b) {
    (void)obj; (void)a; (void)b;
    return 1;
}

static const dpp_backend_ops BACKEND_OPS = {
    sizeof(dpp_backend_ops), 0, be_destroy, be_device_count, be_device_info, be_host_memory,
    be_create_pagemap, be_can_access_peer,
};

/* the plug-in */

static int32_t probe(const dpp_host_services *host, dpp_error *e) {
    g_host = host;
#if defined(DPP_TEST_PROBE_FAIL)
    return fail(e, DPP_E_UNAVAILABLE, "no hostmem device on this machine (test variant)");
#elif defined(DPP_TEST_PROBE_PANIC)
    return fail(e, DPP_E_PANICKED, "panicked in probe: internal bug (test variant)");
#else
    (void)e;
    return DPP_OK;
#endif
}

static int eq(const dpp_option *o, const char *key) {
    return o->key_len == strlen(key) && memcmp(o->key, key, o->key_len) == 0;
}

__attribute__((unused)) static int32_t open_backend(const dpp_host_services *host, const dpp_config *c, dpp_backend *out, dpp_error *e) {
    g_host = host;
    backend *b = calloc(1, sizeof *b);
    if (!b) return fail(e, DPP_E_OUT_OF_MEMORY, "hostmem: no memory for the backend");
    for (size_t i = 0; i < c->option_count; i++) {
        const dpp_option *o = &c->options[i];
        if (o->key_len < 8 || memcmp(o->key, "hostmem.", 8) != 0) continue;
        if (eq(o, "hostmem.fail")) {
            size_t n = o->value_len < sizeof b->fail - 1 ? o->value_len : sizeof b->fail - 1;
            memcpy(b->fail, o->value, n);
        } else if (eq(o, "hostmem.hang")) {
            b->hang = o->value_len == 1 && o->value[0] == '1';
        } else if (eq(o, "hostmem.disable")) {
            /* handled by the host's registry */
        } else {
            char msg[160];
            snprintf(msg, sizeof msg, "hostmem: unknown option %.*s (known: hostmem.fail, hostmem.hang)",
                     (int)o->key_len, o->key);
            free(b);
            return fail(e, DPP_E_BAD_CONFIG, msg);
        }
    }
    if (fails(b, "open")) {
        free(b);
        return injected(e, "open");
    }
    b->devices = (c->flags & DPP_CONFIG_HAS_DEVICES) ? (uint32_t)c->devices : 2;
    if (b->devices == 0) {
        free(b);
        return fail(e, DPP_E_BAD_CONFIG, "hostmem: 0 devices");
    }
    b->device_capacity = (c->flags & DPP_CONFIG_HAS_DEVICE_CAPACITY) ? c->device_capacity : (64ull << 20);
    uint64_t host_bytes = (c->flags & DPP_CONFIG_HAS_HOST_CAPACITY) ? c->host_capacity : (256ull << 20);
    if (!arena_init(&b->host, host_bytes)) {
        arena_fini(&b->host);
        free(b);
        return fail(e, DPP_E_OUT_OF_MEMORY, "hostmem: host arena");
    }
    out->obj = b;
    out->ops = &BACKEND_OPS;
    return DPP_OK;
}

static const dpp_plugin_v1 TABLE = {
#ifdef DPP_TEST_VERSION
    DPP_TEST_VERSION,
#else
    DPP_ABI_VERSION,
#endif
#ifdef DPP_TEST_TRUNCATED
    16,
#else
    sizeof(dpp_plugin_v1),
#endif
    DPP_NAME,
    "host-memory arenas as devices, in C (minimal example)",
    0,
    probe,
#ifdef DPP_TEST_NULL_OPEN
    NULL,
#else
    open_backend,
#endif
};

#if defined(DPP_TEST_V2_ONLY)
const dpp_plugin_v1 *drm_pagemap_plugin_v2(void) { return &TABLE; }
#elif !defined(DPP_TEST_NO_ENTRY)
const dpp_plugin_v1 *drm_pagemap_plugin_v1(void) { return &TABLE; }
#else
int drm_pagemap_something_else(void) { return TABLE.abi_version; }
#endif
