/* Realm native kernels: the persistent thread pool.
 *
 * Workers are created once (realm_threads_set, or lazily on first use) and wait for jobs; a
 * job runs fn(ctx, ith, nth) for each share ith in [0, nth). Shares are claimed, not assigned:
 * the caller and every worker that wakes take the next unclaimed share until none is left, so
 * a worker that is late (descheduled on a shared machine, asleep) costs nothing — the caller
 * runs its share — and the caller waits only for shares already under way. (With fixed
 * assignment, one descheduled worker stalled every job of a decode step for a scheduler time
 * slice: decode ran 10-20x slower beside one busy process.) Waiting spins briefly (decode
 * issues hundreds of short jobs per token) and then sleeps on a condition variable, so an idle
 * pool costs no CPU. One job runs at a time: concurrent callers (Python threads with the GIL
 * released) queue on job_lock. Shares must be independent (no barriers inside fn): one thread
 * may run several of them in turn.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_ITERS 20000 /* ~50-100 us of polling before sleeping */
#define MAX_THREADS 256

typedef struct {
    pthread_mutex_t job_lock;  /* one job at a time; also guards resizing */
    pthread_mutex_t m;         /* guards the condition variables */
    pthread_cond_t start_cv;
    pthread_cond_t done_cv;
    int n_threads;             /* including the caller */
    int started;               /* workers exist */
    pthread_t workers[MAX_THREADS];
    realm_task_fn fn;
    void *ctx;
    int job_nth;
    atomic_uint_fast64_t generation;
    atomic_uint_fast64_t claim;  /* (generation << 16) | next unclaimed share of the job */
    atomic_int finished;       /* shares of the current job done */
    atomic_int stop;
    uint_fast64_t start_generation;  /* generation when the workers were created */
} pool_t;

static pool_t pool = {
    .job_lock = PTHREAD_MUTEX_INITIALIZER,
    .m = PTHREAD_MUTEX_INITIALIZER,
    .start_cv = PTHREAD_COND_INITIALIZER,
    .done_cv = PTHREAD_COND_INITIALIZER,
};

static int online_cores(void) {
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* Claim and run shares of job `gen` until none is left (or a later job has replaced it). A
 * successful claim means the job is still live (its last share is not done), so fn, ctx and
 * job_nth, written before the claim word was published, are that job's. */
static void run_shares(uint_fast64_t gen) {
    for (;;) {
        uint_fast64_t c = atomic_load_explicit(&pool.claim, memory_order_acquire);
        if ((c >> 16) != (gen & 0xffffffffffffULL)) return;
        const int share = (int)(c & 0xffff), nth = pool.job_nth;
        if (share >= nth) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.claim, &c, c + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        pool.fn(pool.ctx, share, nth);
        if (atomic_fetch_add_explicit(&pool.finished, 1, memory_order_acq_rel) + 1 == nth) {
            pthread_mutex_lock(&pool.m);
            pthread_cond_signal(&pool.done_cv);
            pthread_mutex_unlock(&pool.m);
        }
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    /* not the live value: a job may already have been posted before this thread ran */
    uint_fast64_t seen = pool.start_generation;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen &&
               !atomic_load(&pool.stop)) {
            if (++spins < SPIN_ITERS) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool.m);
            while (atomic_load(&pool.generation) == seen && !atomic_load(&pool.stop))
                pthread_cond_wait(&pool.start_cv, &pool.m);
            pthread_mutex_unlock(&pool.m);
        }
        if (atomic_load(&pool.stop)) return NULL;
        seen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        run_shares(seen);  /* nothing left to claim when it arrives late: back to waiting */
    }
}

static void stop_workers(void) {
    if (!pool.started) return;
    pthread_mutex_lock(&pool.m);
    atomic_store(&pool.stop, 1);
    pthread_cond_broadcast(&pool.start_cv);
    pthread_mutex_unlock(&pool.m);
    for (int i = 1; i < pool.n_threads; i++) pthread_join(pool.workers[i], NULL);
    atomic_store(&pool.stop, 0);
    pool.started = 0;
}

/* Called with job_lock held. */
static int start_workers(int n) {
    if (n <= 0) n = online_cores();
    if (n > MAX_THREADS) n = MAX_THREADS;
    pool.n_threads = n;
    pool.start_generation = atomic_load(&pool.generation);
    for (int i = 1; i < n; i++) {
        if (pthread_create(&pool.workers[i], NULL, worker_main, (void *)(intptr_t)i) != 0) {
            pool.n_threads = i;  /* join what started */
            stop_workers();
            pool.n_threads = 1;
            pool.started = 1;
            return REALM_ETHREAD;
        }
    }
    pool.started = 1;
    return REALM_OK;
}

static void after_fork_in_child(void) {
    /* the workers do not exist in a forked child: start afresh on next use */
    pthread_mutex_init(&pool.job_lock, NULL);
    pthread_mutex_init(&pool.m, NULL);
    pthread_cond_init(&pool.start_cv, NULL);
    pthread_cond_init(&pool.done_cv, NULL);
    pool.started = 0;
    atomic_store(&pool.stop, 0);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void register_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork_in_child); }

int realm_threads_set(int n_threads) {
    pthread_once(&fork_once, register_fork_handler);
    pthread_mutex_lock(&pool.job_lock);
    stop_workers();
    int rc = start_workers(n_threads);
    pthread_mutex_unlock(&pool.job_lock);
    return rc;
}

int realm_threads_get(void) {
    pthread_once(&fork_once, register_fork_handler);
    pthread_mutex_lock(&pool.job_lock);
    if (!pool.started) start_workers(0);
    int n = pool.n_threads;
    pthread_mutex_unlock(&pool.job_lock);
    return n;
}

int realm_parallel(realm_task_fn fn, void *ctx, int max_threads) {
    pthread_once(&fork_once, register_fork_handler);
    pthread_mutex_lock(&pool.job_lock);
    if (!pool.started) start_workers(0);
    int nth = pool.n_threads;
    if (max_threads > 0 && max_threads < nth) nth = max_threads;
    if (nth <= 1) {
        fn(ctx, 0, 1);
        pthread_mutex_unlock(&pool.job_lock);
        return REALM_OK;  /* a pool that could not start degrades to the caller alone */
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.job_nth = nth;
    atomic_store_explicit(&pool.finished, 0, memory_order_relaxed);
    const uint_fast64_t gen = atomic_load(&pool.generation) + 1;
    /* publish the shares (release: fn, ctx, job_nth and finished are visible to a claimer) */
    atomic_store_explicit(&pool.claim, (gen & 0xffffffffffffULL) << 16, memory_order_release);
    pthread_mutex_lock(&pool.m);
    atomic_store_explicit(&pool.generation, gen, memory_order_release);
    pthread_cond_broadcast(&pool.start_cv);
    pthread_mutex_unlock(&pool.m);

    run_shares(gen);  /* the caller works too, and takes the shares of late workers */

    int spins = 0;
    while (atomic_load_explicit(&pool.finished, memory_order_acquire) < nth) {
        if (++spins < SPIN_ITERS) {
            cpu_relax();
            continue;
        }
        pthread_mutex_lock(&pool.m);
        while (atomic_load(&pool.finished) < nth) pthread_cond_wait(&pool.done_cv, &pool.m);
        pthread_mutex_unlock(&pool.m);
    }
    pthread_mutex_unlock(&pool.job_lock);
    return REALM_OK;
}
