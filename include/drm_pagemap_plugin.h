/*
 * drm_pagemap_plugin.h - the drm-pagemap plug-in C ABI, version 1.
 *
 * A plug-in is a shared object that exports
 *
 *     const dpp_plugin_v1 *drm_pagemap_plugin_v1(void);
 *
 * returning a pointer to a static table. The host reads `abi_version` and `struct_size`
 * first and rejects the plug-in before calling anything else in it when the version is not
 * one it supports, the table is smaller than `sizeof(dpp_plugin_v1)`, or a required entry is
 * NULL. A later ABI version gets a new symbol (`drm_pagemap_plugin_v2`); a host probes the
 * newest symbol it knows first.
 *
 * The tables mirror the Rust traits of drm-pagemap-core one to one (Backend, HostMemory,
 * PagemapOps, DevmemOps, FenceOps). Rules for every table:
 *   - its first field is `struct_size` (sizeof the table as its implementer was built); the
 *     reader reads only what that size covers and treats the rest as absent (NULL / 0);
 *   - tables only grow at the end; fields are never reordered;
 *   - "Required" entries must be non-NULL; a NULL "Optional" entry gets the documented default.
 *
 * Conventions:
 *   - Handles are opaque `void *obj` plus a table of operations.
 *   - Entries that can fail return int32_t: DPP_OK or a DPP_E_* code, and fill the
 *     caller-allocated `dpp_error *error` (which may be NULL). Its strings belong to the
 *     callee and stay valid until the same thread's next call into the callee.
 *   - Buffers are caller-allocated (pointer + count); the callee never keeps them.
 *   - Threading: every entry may be called from any thread, concurrently. Entries do not
 *     block unless documented ("may block"); copies are asynchronous and return a fence.
 *   - Never let an exception or a longjmp cross an entry.
 *   - The plug-in is never unloaded by the host while any object from it may be used.
 *
 * Keep this file in sync with drm-pagemap-plugin/src/abi.rs: a test compiles a layout check of
 * every struct here against the Rust definitions.
 */
#ifndef DRM_PAGEMAP_PLUGIN_H
#define DRM_PAGEMAP_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DPP_ABI_VERSION 1

/* Status codes. */
#define DPP_OK 0
#define DPP_PENDING 1            /* fence status only: not signalled yet */
#define DPP_TIMEOUT 2            /* fence wait only: the time ran out */
#define DPP_E_OUT_OF_MEMORY 10   /* the only transient error: retry after releases */
#define DPP_E_DEVICE_LOST 11
#define DPP_E_MAP_FAILED 12
#define DPP_E_COPY_FAILED 13
#define DPP_E_UNSUPPORTED 14     /* also: an optional feature is absent */
#define DPP_E_UNAVAILABLE 15
#define DPP_E_INJECTED 16        /* a fault injected on purpose (tests) */
#define DPP_E_BAD_CONFIG 17
#define DPP_E_DRIVER 18          /* dpp_error.api and .driver_code are set */
#define DPP_E_PANICKED 19        /* the callee hit a bug; nothing to undo */
#define DPP_E_INVALID_ARGUMENT 20

#define DPP_PLUGIN_IS_GPU 1ull

#define DPP_CONFIG_HAS_DEVICES 1u
#define DPP_CONFIG_HAS_DEVICE_CAPACITY 2u
#define DPP_CONFIG_HAS_HOST_CAPACITY 4u

#define DPP_DIR_TO_DEVICE 0u     /* the device reads through the mapping */
#define DPP_DIR_FROM_DEVICE 1u   /* the device writes through the mapping */

#define DPP_LOG_ERROR 1u
#define DPP_LOG_WARN 2u
#define DPP_LOG_INFO 3u
#define DPP_LOG_DEBUG 4u

/* Native fence kinds: CUDA event 1, Level Zero event 2; a plug-in's own from 0x1000. */
#define DPP_NATIVE_CUDA_EVENT 1u
#define DPP_NATIVE_LEVEL_ZERO_EVENT 2u
#define DPP_NATIVE_PLUGIN_FIRST 0x1000u
#define DPP_NATIVE_COMPLETE 1u   /* dpp_native_fence.flags: completion is the whole outcome */

/* An error, filled by the callee into the caller's struct. */
typedef struct dpp_error {
    int32_t kind;          /* the DPP_E_* code the entry returned */
    uint32_t flags;        /* 0 */
    int64_t driver_code;   /* DPP_E_DRIVER: the raw driver code (CUresult, ze_result_t) */
    const char *api;       /* DPP_E_DRIVER: the driver entry point; may be NULL */
    const char *message;   /* what failed, naming device / pagemap / range; may be NULL */
} dpp_error;

/* A fence's native primitive (the core's NativeFence). */
typedef struct dpp_native_fence {
    uint32_t kind;         /* DPP_NATIVE_* */
    uint32_t flags;        /* DPP_NATIVE_COMPLETE */
    uint64_t domain;       /* the API instance owning the handle (a CUcontext, ...) */
    uint64_t handle;       /* the raw handle; valid while a reference to the fence is held */
} dpp_native_fence;

/* A completion callback: status DPP_OK or an error code; error NULL on success, valid only
 * during the call. Runs in the signalling thread: keep it short, never block. */
typedef void (*dpp_fence_callback)(void *user, int32_t status, const dpp_error *error);

typedef struct dpp_fence_ops dpp_fence_ops;

/* A reference to a fence. obj == NULL means "no fence". A reference received as an
 * out-parameter is owned by the receiver, who releases it. */
typedef struct dpp_fence {
    void *obj;
    const dpp_fence_ops *ops;
} dpp_fence;

/* FenceOps. Implemented by whichever side made the fence (the plug-in for its copies, the
 * host for pre-fences and host fences). Any thread. */
struct dpp_fence_ops {
    uint32_t struct_size;
    uint32_t reserved;
    /* Required. Another reference: returns the object to use (and release) for it. */
    void *(*retain)(void *obj);
    /* Required. Drops one reference. */
    void (*release)(void *obj);
    /* Required. Its timeline: a context id from the host's allocator. */
    uint64_t (*context)(void *obj);
    /* Required. Its position on the timeline. */
    uint64_t (*seqno)(void *obj);
    /* Required. Polls: DPP_PENDING, DPP_OK, or the error it signalled (fills error). Sticky. */
    int32_t (*status)(void *obj, dpp_error *error);
    /* Required. May block: until signalled or timeout_ns (UINT64_MAX: no limit):
     * DPP_OK, DPP_TIMEOUT, or the error it signalled. */
    int32_t (*wait)(void *obj, uint64_t timeout_ns, dpp_error *error);
    /* Optional (NULL: none). DPP_OK and *out filled, or DPP_E_UNSUPPORTED when none. */
    int32_t (*native)(void *obj, dpp_native_fence *out);
    /* Optional (NULL: the caller polls). Registers cb(user, ...) to run exactly once, in the
     * signalling thread, or now when signalled: DPP_OK. DPP_E_UNSUPPORTED: not registered. */
    int32_t (*add_callback)(void *obj, dpp_fence_callback cb, void *user);
    /* Optional (NULL: not a container). How many fences this one aggregates (0: single). */
    size_t (*member_count)(void *obj);
    /* Optional, with member_count. *out gets a new reference to member index. */
    int32_t (*member_at)(void *obj, size_t index, dpp_fence *out);
};

/* What the host offers; handed to probe and open, valid until the process ends. Any thread. */
typedef struct dpp_host_services {
    uint32_t abi_version;
    uint32_t struct_size;
    void *host;            /* pass back as the first argument of the entries below */
    /* Reserves count consecutive fence context ids; returns the first (never 0, never twice). */
    uint64_t (*reserve_fence_contexts)(void *host, uint64_t count);
    /* Logs len bytes of UTF-8 at level DPP_LOG_*; the host copies them. */
    void (*log)(void *host, uint32_t level, const char *msg, size_t len);
    /* Creates a host fence at (context, seqno): *out_fence a reference, *out_signal a one-shot
     * handle for fence_signal. */
    int32_t (*fence_create)(void *host, uint64_t context, uint64_t seqno, dpp_fence *out_fence,
                            void **out_signal);
    /* Signals (success when error is NULL) and consumes the signal handle; runs callbacks. */
    void (*fence_signal)(void *host, void *signal, const dpp_error *error);
    /* Runs cb(user, ...) once on the host's fence worker thread after fence signalled
     * (fence is borrowed): deferred work without a thread of the plug-in's own. */
    int32_t (*on_signal)(void *host, const dpp_fence *fence, dpp_fence_callback cb, void *user);
} dpp_host_services;

/* One option key=value (the full key, e.g. "tier.path"); UTF-8 with lengths. */
typedef struct dpp_option {
    const char *key;
    size_t key_len;
    const char *value;
    size_t value_len;
} dpp_option;

/* BackendConfig; borrowed for the open call. */
typedef struct dpp_config {
    uint32_t struct_size;
    uint32_t flags;              /* DPP_CONFIG_HAS_* */
    uint64_t devices;
    uint64_t device_capacity;    /* bytes per device */
    uint64_t host_capacity;      /* bytes of host memory for system pages */
    const dpp_option *options;   /* every option; read the keys under your name */
    size_t option_count;
    uint32_t options_version;
    uint32_t reserved;
} dpp_config;

typedef struct dpp_backend dpp_backend;

/* The plug-in's table, ABI version 1 (static). */
typedef struct dpp_plugin_v1 {
    uint32_t abi_version;        /* 1 */
    uint32_t struct_size;        /* sizeof(dpp_plugin_v1) */
    const char *name;            /* Required. [a-z0-9_-]{1,32}; the prefix of its option keys */
    const char *description;     /* Optional. One line */
    uint64_t flags;              /* DPP_PLUGIN_IS_GPU */
    /* Required. May block briefly. DPP_OK when usable here, else an error saying why not.
     * Opens nothing lasting. */
    int32_t (*probe)(const dpp_host_services *host, dpp_error *error);
    /* Required. May block. Opens the backend into *out; the host destroys it once no object
     * from it is alive. */
    int32_t (*open)(const dpp_host_services *host, const dpp_config *config, dpp_backend *out,
                    dpp_error *error);
} dpp_plugin_v1;

/* DeviceInfo. */
typedef struct dpp_device_info {
    uint32_t id;
    uint8_t name_len;
    char name[63];               /* UTF-8, not NUL-terminated */
    uint64_t memory_bytes;
} dpp_device_info;

typedef struct dpp_backend_ops dpp_backend_ops;
typedef struct dpp_host_memory_ops dpp_host_memory_ops;
typedef struct dpp_pagemap_ops dpp_pagemap_ops;
typedef struct dpp_devmem_ops dpp_devmem_ops;

struct dpp_backend {
    void *obj;
    const dpp_backend_ops *ops;
};

typedef struct dpp_host_memory {
    void *obj;
    const dpp_host_memory_ops *ops;
} dpp_host_memory;

/* PagemapSpec. */
typedef struct dpp_pagemap_spec {
    uint32_t id;                 /* 0..255 */
    uint32_t device;
    uint32_t owner;              /* when has_owner is 1; else the backend picks */
    uint32_t has_owner;
    uint64_t capacity_bytes;
} dpp_pagemap_spec;

/* A pagemap: one object, two tables. */
typedef struct dpp_pagemap {
    void *obj;
    const dpp_pagemap_ops *pagemap_ops;
    const dpp_devmem_ops *devmem_ops;
    uint32_t owner;
    uint32_t device;
    const char *name;            /* valid while obj lives; may be NULL */
} dpp_pagemap;

/* Backend. */
struct dpp_backend_ops {
    uint32_t struct_size;
    uint32_t reserved;
    /* Required. Frees the backend, once, after every object from it is gone. */
    void (*destroy)(void *obj);
    /* Required. */
    uint32_t (*device_count)(void *obj);
    /* Required. DPP_OK, or DPP_E_INVALID_ARGUMENT past the end. */
    int32_t (*device_info)(void *obj, uint32_t index, dpp_device_info *out);
    /* Required. Called once; the host keeps the result. */
    int32_t (*host_memory)(void *obj, dpp_host_memory *out, dpp_error *error);
    /* Required. May block (allocates). */
    int32_t (*create_pagemap)(void *obj, const dpp_pagemap_spec *spec, dpp_pagemap *out,
                              dpp_error *error);
    /* Optional (NULL: never). 1 when a's copy engine writes b's memory directly. */
    int32_t (*can_access_peer)(void *obj, uint32_t a, uint32_t b);
};

/* PagemapOps. */
struct dpp_pagemap_ops {
    uint32_t struct_size;
    uint32_t reserved;
    /* Required. Frees the pagemap object, once (its allocations were released before). */
    void (*destroy)(void *obj);
    /* Required. out[i]: the address by which device reaches pfns[i]. All or nothing. */
    int32_t (*device_map)(void *obj, uint32_t device, const uint32_t *pfns, size_t n,
                          uint64_t page_size, uint32_t dir, uint64_t *out, dpp_error *error);
    /* Required. Undoes device_map; 0 entries are skipped. */
    void (*device_unmap)(void *obj, uint32_t device, const uint64_t *addrs, size_t n,
                         uint64_t page_size, uint32_t dir);
};

/* DevmemBacking. */
typedef struct dpp_devmem_backing {
    uint64_t cookie;
    uint64_t npages;
    uint64_t page_size;
    /* From allocate: the fence to wait for before writing (the host takes the reference), or
     * obj == NULL when the pages are ready. In release calls: always none. */
    dpp_fence pre_migrate_fence;
} dpp_devmem_backing;

/* CopyRequest; borrowed for the call. */
typedef struct dpp_copy_request {
    uint64_t page_size;
    const uint32_t *pages;       /* the executor's device pages */
    const uint64_t *addrs;       /* the other side's addresses; 0: skip the entry */
    size_t count;
    const dpp_fence *pre_fence;  /* NULL: none. Borrowed: retain it to keep it */
} dpp_copy_request;

/* CopyCaps. */
typedef struct dpp_copy_caps {
    uint64_t max_command_bytes;  /* 0: no limit */
    uint32_t native_kind_count;  /* <= 4 */
    uint32_t native_kinds[4];
    uint32_t host_fences;        /* 0 blocking in the call, 1 in queue, 2 deferred */
    uint32_t in_order;
    uint64_t batch_bytes_hint;   /* 0: no preference */
} dpp_copy_caps;

/* DevmemOps. */
struct dpp_devmem_ops {
    uint32_t struct_size;
    uint32_t reserved;
    /* Required. The pages read as zeros once out->pre_migrate_fence signalled. */
    int32_t (*allocate)(void *obj, uint64_t npages, uint64_t page_size, dpp_devmem_backing *out,
                        dpp_error *error);
    /* Required. out[0..n]: the allocation's pfns in address order (n == backing->npages). */
    int32_t (*populate_devmem_pfn)(void *obj, const dpp_devmem_backing *backing, uint32_t *out,
                                   size_t n, dpp_error *error);
    /* Required. Copies into this device's pages; *out gets the copy's fence. Never writes
     * before req->pre_fence signalled; a failed pre-fence fails *out. Blocks only as the
     * caps' host_fences says. */
    int32_t (*copy_to_devmem)(void *obj, const dpp_copy_request *req, dpp_fence *out,
                              dpp_error *error);
    /* Required. Copies this device's pages out to the addresses; as copy_to_devmem. */
    int32_t (*copy_to_ram)(void *obj, const dpp_copy_request *req, dpp_fence *out,
                           dpp_error *error);
    /* Required. Frees an allocation, exactly once, when no page uses it. */
    void (*devmem_release)(void *obj, const dpp_devmem_backing *backing);
    /* Optional (NULL: devmem_release each). */
    void (*devmem_release_many)(void *obj, const dpp_devmem_backing *backings, size_t n);
    /* Optional (NULL: devmem_release). An allocation no copy was issued into. */
    void (*devmem_release_unused)(void *obj, const dpp_devmem_backing *backing);
    /* Required. */
    uint64_t (*capacity_bytes)(void *obj);
    /* Optional (NULL: conservative caps). Constant for the pagemap's life. */
    void (*caps)(void *obj, dpp_copy_caps *out);
};

/* HostMemory. read / write / zero cannot fail in the trait: an error there is a plug-in bug,
 * which the host reports loudly. */
struct dpp_host_memory_ops {
    uint32_t struct_size;
    uint32_t reserved;
    /* Required. Frees the object, once. */
    void (*destroy)(void *obj);
    /* Required. n frames (4 KiB frame numbers) of page_size into out. All or nothing. */
    int32_t (*alloc_frames)(void *obj, uint64_t page_size, uint64_t *out, size_t n,
                            dpp_error *error);
    /* Required. */
    void (*free_frames)(void *obj, const uint64_t *frames, size_t n, uint64_t page_size);
    /* Required. len bytes out of frame from offset (inside the page). */
    int32_t (*read)(void *obj, uint64_t frame, size_t offset, uint8_t *buf, size_t len,
                    dpp_error *error);
    /* Required. len bytes into frame at offset (inside the page). */
    int32_t (*write)(void *obj, uint64_t frame, size_t offset, const uint8_t *data, size_t len,
                     dpp_error *error);
    /* Required. Zeroes a whole page. */
    int32_t (*zero)(void *obj, uint64_t frame, uint64_t page_size, dpp_error *error);
    /* Required. out[i]: the address by which device reaches frames[i]. */
    int32_t (*map_frames)(void *obj, uint32_t device, const uint64_t *frames, size_t n,
                          uint64_t page_size, uint32_t dir, uint64_t *out, dpp_error *error);
    /* Required. Undoes map_frames; 0 entries are skipped. */
    void (*unmap_frames)(void *obj, uint32_t device, const uint64_t *addrs, size_t n,
                         uint64_t page_size, uint32_t dir);
    /* Required. */
    uint64_t (*capacity_bytes)(void *obj);
};

/* The entry symbol of ABI version 1. */
typedef const dpp_plugin_v1 *(*dpp_entry_v1)(void);

#ifdef __cplusplus
}
#endif

#endif /* DRM_PAGEMAP_PLUGIN_H */
