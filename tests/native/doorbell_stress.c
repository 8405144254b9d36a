/*
 * The doorbell's Dekker pair (protocol.h: shm_must_ring, shm_set_sleeping) on two real
 * threads, without Python: does a client's frame ever wait for the coordinator's
 * timeout because neither side saw the other (a lost wake-up)?
 *
 *   client thread       bursts of frames: HEAD += 1 (release), then shm_must_ring;
 *                       it posts the semaphore when told to (once per SLEEPING value);
 *                       after a burst it waits until the coordinator has taken
 *                       everything (TAIL == HEAD) and times that wait.
 *   coordinator thread  the loop of coordinator/_server.py's _wait_compiled: take
 *                       whatever HEAD shows; when nothing is pending, set SLEEPING to a
 *                       new value, look at HEAD again, and only if it did not move block
 *                       on the semaphore with a timeout (TIMEOUT_MS); then SLEEPING = 0.
 *
 * A lost wake-up shows as a client wait of about TIMEOUT_MS (a healthy one takes
 * microseconds): counted as `lost` when it exceeds LOST_MS. Exit 1 if lost > 0 or no
 * burst completed.
 *
 -DSHM_BROKEN_RECHECK: the coordinator blocks without looking at HEAD again after
 * setting SLEEPING (the classic lost wake-up: a frame published just before SLEEPING
 * was set saw 0 and did not post). The harness must then count lost wake-ups: the test
 * shows the check can fail. (Taking the seq_cst fences out instead, which x86-64 needs
 * against a load passing an earlier store, loses wake-ups too rarely to show in a
 * second here: that half of the argument rests on the C11 model, not on this run.)
 *
 * Usage: doorbell_stress [seconds]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "protocol.h"

#ifdef SHM_BROKEN_RECHECK
#define RECHECK(h) 1
#define WIDEN() sched_yield() /* widen the window a frame can slip through */
#else
#define WIDEN() ((void)0)
#define RECHECK(h) (shm_load_acquire(&head) == (h))
#endif

#define TIMEOUT_MS 200 /* the coordinator's blocking wait (its tick) */
#define LOST_MS 150    /* a client wait this long was a lost wake-up */

static uint64_t ch[16]; /* the channel header: SLEEPING, ELIDE */
static uint64_t head, tail;
static sem_t bell;
static int stop;
static uint64_t posts, sleeps, lost, bursts, frames;
static double worst_ms;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void *coordinator(void *arg)
{
    (void)arg;
    uint64_t s = 0;
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
        uint64_t h = shm_load_acquire(&head);
        if (h != shm_load_relaxed(&tail)) {
            shm_store_release(&tail, h); /* took every frame up to h */
            continue;
        }
        WIDEN();
        shm_set_sleeping(ch, ++s);
        if (RECHECK(h)) {
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_nsec += (long)TIMEOUT_MS * 1000000L;
            until.tv_sec += until.tv_nsec / 1000000000L;
            until.tv_nsec %= 1000000000L;
            __atomic_fetch_add(&sleeps, 1, __ATOMIC_RELAXED);
            while (sem_timedwait(&bell, &until) < 0 && errno == EINTR)
                ;
        }
        shm_set_sleeping(ch, 0);
    }
    return NULL;
}

static void *client(void *arg)
{
    double seconds = *(double *)arg;
    double end = now_s() + seconds;
    long long posted = 0;
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    while (now_s() < end) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        unsigned n = 1 + (unsigned)(rng >> 60); /* 1..16 frames a burst */
        uint64_t h = 0;
        for (unsigned i = 0; i < n; i++) {
            h = shm_load_relaxed(&head) + 1;
            shm_store_release(&head, h);
            long long r = shm_must_ring(ch, posted);
            if (r) {
                if (r > 0)
                    posted = r;
                sem_post(&bell);
                posts++;
            }
            frames++;
        }
        double t0 = now_s();
        while (shm_load_acquire(&tail) < h)
            sched_yield();
        double ms = (now_s() - t0) * 1e3;
        if (ms > worst_ms)
            worst_ms = ms;
        if (ms > LOST_MS)
            lost++;
        bursts++;
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    sem_post(&bell);
    return NULL;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    ch[SHM_CH_ELIDE] = 1;
    sem_init(&bell, 0, 0);
    pthread_t c, k;
    pthread_create(&c, NULL, coordinator, NULL);
    pthread_create(&k, NULL, client, &seconds);
    pthread_join(k, NULL);
    pthread_join(c, NULL);
    printf("bursts %llu frames %llu posts %llu sleeps %llu lost %llu worst_ms %.3f\n", (unsigned long long)bursts,
           (unsigned long long)frames, (unsigned long long)posts, (unsigned long long)sleeps,
           (unsigned long long)lost, worst_ms);
    return lost || !bursts ? 1 : 0;
}
