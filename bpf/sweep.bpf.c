// SPDX-License-Identifier: Apache-2.0
/*
 * sweep.bpf.c - the conntrack cleaner's removals, done in the kernel.
 *
 * The cleaner (conntrack/sweep.py) decides which np_ct entries are dead: their flow is
 * gone from the kernel's conntrack table. It must still not remove an entry used since
 * the sweep began (a flow reusing a just-freed port has the same key). Checked and
 * removed one syscall at a time, that is a quarter of a million syscalls for a large
 * table; here one run of np_sweep checks and removes a batch:
 *
 *   user space writes the batch's keys into np_sweep_keys (one batched update), then
 *   runs np_sweep (BPF_PROG_TEST_RUN) with struct np_sweep_args as its context; for each
 *   key the program reads the entry and removes it unless last_seen_ns >= started
 *   (touched) or >= old_enough (young: kept by the cleaner's fallback rule). The counts
 *   come back in the same context.
 *
 * Not attached anywhere; loaded by the cleaner with np_ct reused from its pin.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "np.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NP_CT_DEFAULT_ENTRIES); /* set to the pinned map's at load */
	__type(key, struct np_ct_key);
	__type(value, struct np_ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NP_SWEEP_BATCH);
	__type(key, __u32);
	__type(value, struct np_ct_key);
} np_sweep_keys SEC(".maps");

struct np_sweep_state {
	__u64 started_ns;
	__u64 old_enough_ns;
	__u32 removed;
	__u32 touched;
	__u32 young;
	__u32 gone;
};

static long np_sweep_one(__u32 index, void *ctx)
{
	struct np_sweep_state *st = ctx;
	struct np_ct_key *key;
	struct np_ct_value *v;
	__u64 seen;

	key = bpf_map_lookup_elem(&np_sweep_keys, &index);
	if (!key)
		return 1;
	v = bpf_map_lookup_elem(&np_ct, key);
	if (!v) {
		st->gone++;
		return 0;
	}
	seen = v->last_seen_ns;
	if (seen >= st->started_ns) {
		st->touched++;
		return 0;
	}
	if (seen >= st->old_enough_ns) {
		st->young++;
		return 0;
	}
	if (bpf_map_delete_elem(&np_ct, key) == 0)
		st->removed++;
	else
		st->gone++;
	return 0;
}

SEC("syscall")
int np_sweep(struct np_sweep_args *args)
{
	struct np_sweep_state st = {
		.started_ns = args->started_ns,
		.old_enough_ns = args->old_enough_ns,
	};
	__u32 count = args->count;

	if (count > NP_SWEEP_BATCH)
		count = NP_SWEEP_BATCH;
	bpf_loop(count, np_sweep_one, &st, 0);
	args->removed = st.removed;
	args->touched = st.touched;
	args->young = st.young;
	args->gone = st.gone;
	return 0;
}
