// BlockManager: the paged KV cache's blocks, reference counts and prefix cache.
#pragma once

#include <cstdint>
#include <optional>
#include <unordered_map>
#include <vector>

#include "llmapi/free_block_queue.h"

namespace llmapi {

// Allocation order (deterministic, pinned by the tests):
//  * The free queue starts as 0, 1, ..., N-1; new blocks are taken from its head.
//  * A block whose reference count drops to 0 joins the tail. free() releases a block table in
//    reverse, so a finished request's last blocks (the least shareable) are evicted first and its
//    leading prefix blocks last.
//  * A full block is hashed once its KV is computed: hash = H(parent block's hash, its token ids),
//    H chained from kRootHash, so equal hashes mean equal whole prefixes. The first block holding a
//    given prefix is registered in the cache; a later copy (two requests that computed the same
//    prefix at once) stays private.
//  * A cached block with reference count 0 stays in the free queue and stays findable by hash
//    until it is popped for reuse, when its hash entry is dropped (eviction, LRU order). A lookup
//    hit takes it out of the free queue.
//  * num_free_blocks = never-used or uncached free blocks + cached blocks with reference count 0.
//  * Sliding window: release_leading() hands back a table's leading blocks, which no step reads
//    again; their entries become kReleased (fork, free and cache_full_blocks pass over them).
class BlockManager {
 public:
  static constexpr uint64_t kRootHash = 0x6c6c6d617069ULL;  // parent hash of a sequence's first block
  // A block-table entry whose block was handed back: it lay wholly before the request's sliding
  // window, so no kernel reads it (a batch's block table carries it as -1).
  static constexpr int32_t kReleased = -1;

  // Hash of a full block given its parent's hash (kRootHash for the first block).
  static uint64_t hash_block_tokens(uint64_t parent_hash, const int32_t* tokens, int32_t count);

  // The parent hash of a sequence's first block: kRootHash, or for a request with a cache salt (its
  // LoRA adapter, its prompt table) a root of its own, so its blocks never match another root's.
  static uint64_t root_hash(uint64_t cache_salt);

  BlockManager(int32_t num_blocks, int32_t tokens_per_block, bool enable_prefix_caching);

  // Cached blocks holding a prefix of `tokens`, verified token by token. At most
  // floor((len - 1) / B) blocks, so at least one token is left to compute (its logits sample the
  // next token). Empty when prefix caching is off. Touches nothing.
  std::vector<int32_t> lookup(const std::vector<int32_t>& tokens, uint64_t root = kRootHash) const;

  // Grows `block_ids` to cover `num_tokens` tokens. If `cached_prefix` (from lookup) is given,
  // `block_ids` must be empty and those blocks are taken first (reference count + 1). Returns
  // false and changes nothing when not enough blocks are free.
  bool allocate(std::vector<int32_t>& block_ids, int32_t num_tokens,
                const std::vector<int32_t>& cached_prefix = {});

  // The free blocks allocate(block_ids, num_tokens, cached_prefix) takes (new blocks, and prefix
  // blocks nobody references, which sit in the free queue). Touches nothing.
  int32_t blocks_taken(const std::vector<int32_t>& block_ids, int32_t num_tokens,
                       const std::vector<int32_t>& cached_prefix = {}) const;

  // As allocate, for a step that writes positions from `write_from` on: if the block holding
  // that position is shared (a forked sequence's last, partly filled block), it is replaced by a
  // new block and (source, destination) is appended to `copies`, for the runner to copy its KV
  // before the step (copy-on-write). All or nothing: false when the blocks are not there.
  bool allocate_for_write(std::vector<int32_t>& block_ids, int32_t write_from, int32_t num_tokens,
                          std::vector<int32_t>& copies);

  // Shares a block table with a forked sequence: each block's reference count + 1; returns it.
  std::vector<int32_t> fork(const std::vector<int32_t>& block_ids);

  // Releases a block table, last block first, and clears it.
  void free(std::vector<int32_t>& block_ids);

  // Keeps the blocks holding the first `num_tokens` positions and releases the rest, last first (a
  // speculative step's rejected drafts: blocks past the accepted tokens go back).
  void truncate(std::vector<int32_t>& block_ids, int32_t num_tokens);

  // Hands back the blocks of the first `count` entries of `block_ids` that are not released yet, in
  // table order: each loses a reference and at 0 joins the free queue's tail, still findable by
  // hash (evictable, as a finished request's blocks); a block that others share stays theirs. The
  // entries become kReleased. Returns the number of entries it released.
  int32_t release_leading(std::vector<int32_t>& block_ids, int32_t count);

  // Hashes and registers the full blocks among the first `num_computed_tokens` of `tokens`
  // (whose KV is now in the cache) that are not hashed yet. No-op when prefix caching is off.
  // Released entries are passed over; a block right after them chains from its tokens' hashes.
  void cache_full_blocks(const std::vector<int32_t>& block_ids, const std::vector<int32_t>& tokens,
                         int32_t num_computed_tokens, uint64_t root = kRootHash);

  int32_t blocks_for(int32_t num_tokens) const {
    return (num_tokens + tokens_per_block_ - 1) / tokens_per_block_;
  }
  int32_t num_blocks() const { return num_blocks_; }
  int32_t tokens_per_block() const { return tokens_per_block_; }
  bool prefix_caching() const { return prefix_caching_; }
  int32_t num_free_blocks() const { return free_queue_.size(); }
  int32_t num_used_blocks() const { return num_blocks_ - free_queue_.size(); }
  int32_t num_cached_blocks() const { return static_cast<int32_t>(cached_.size()); }
  int32_t ref_count(int32_t block_id) const { return blocks_.at(block_id).ref_count; }
  std::optional<uint64_t> block_hash(int32_t block_id) const;
  std::vector<int32_t> free_queue() const { return free_queue_.to_vector(); }

 private:
  struct Block {
    int32_t ref_count = 0;
    bool hashed = false;
    uint64_t hash = 0;
    uint64_t parent_hash = 0;
    std::vector<int32_t> tokens;  // kept to verify a hash hit exactly, not trust 64 bits
  };

  void check_block_id(int32_t block_id) const;
  void evict(int32_t block_id);  // drops a reused block's hash entry

  int32_t num_blocks_, tokens_per_block_;
  bool prefix_caching_;
  std::vector<Block> blocks_;
  FreeBlockQueue free_queue_;
  std::unordered_map<uint64_t, int32_t> cached_;  // block hash -> the block registered for it
};

}  // namespace llmapi
