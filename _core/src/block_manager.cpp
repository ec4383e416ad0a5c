// BlockManager: reference-counted KV blocks with a chained-hash prefix cache and LRU eviction.
#include "llmapi/block_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace llmapi {

namespace {

// splitmix64's finalizer: cheap, well mixed, and the same on every platform and run (unlike
// std::hash), so hashes are reproducible in tests.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

uint64_t BlockManager::hash_block_tokens(uint64_t parent_hash, const int32_t* tokens,
                                         int32_t count) {
  uint64_t h = mix(parent_hash);
  for (int32_t i = 0; i < count; ++i) h = mix(h ^ static_cast<uint32_t>(tokens[i]));
  return mix(h ^ static_cast<uint64_t>(count));
}

uint64_t BlockManager::root_hash(uint64_t cache_salt) {
  return cache_salt == 0 ? kRootHash : mix(mix(kRootHash) ^ cache_salt);
}

BlockManager::BlockManager(int32_t num_blocks, int32_t tokens_per_block, bool enable_prefix_caching)
    : num_blocks_(num_blocks),
      tokens_per_block_(tokens_per_block),
      prefix_caching_(enable_prefix_caching),
      blocks_(std::max(num_blocks, 0)),
      free_queue_(std::max(num_blocks, 0)) {
  if (num_blocks < 1) throw std::invalid_argument("num_blocks=" + std::to_string(num_blocks) +
                                                  " is invalid: must be >= 1");
  if (tokens_per_block < 1) {
    throw std::invalid_argument("tokens_per_block=" + std::to_string(tokens_per_block) +
                                " is invalid: must be >= 1");
  }
}

void BlockManager::check_block_id(int32_t block_id) const {
  if (block_id < 0 || block_id >= num_blocks_) {
    throw std::invalid_argument("block id " + std::to_string(block_id) + " is out of range [0, " +
                                std::to_string(num_blocks_) + ")");
  }
}

std::optional<uint64_t> BlockManager::block_hash(int32_t block_id) const {
  check_block_id(block_id);
  const Block& b = blocks_[block_id];
  return b.hashed ? std::optional<uint64_t>(b.hash) : std::nullopt;
}

std::vector<int32_t> BlockManager::lookup(const std::vector<int32_t>& tokens, uint64_t root) const {
  std::vector<int32_t> hits;
  if (!prefix_caching_ || tokens.empty()) return hits;
  const int32_t B = tokens_per_block_;
  const int32_t max_blocks = (static_cast<int32_t>(tokens.size()) - 1) / B;
  uint64_t parent = root;
  for (int32_t i = 0; i < max_blocks; ++i) {
    const int32_t* seg = tokens.data() + static_cast<size_t>(i) * B;
    const uint64_t h = hash_block_tokens(parent, seg, B);
    auto it = cached_.find(h);
    if (it == cached_.end()) break;
    const Block& b = blocks_[it->second];
    if (b.parent_hash != parent || !std::equal(b.tokens.begin(), b.tokens.end(), seg)) break;
    hits.push_back(it->second);
    parent = h;
  }
  return hits;
}

bool BlockManager::allocate(std::vector<int32_t>& block_ids, int32_t num_tokens,
                            const std::vector<int32_t>& cached_prefix) {
  if (!cached_prefix.empty() && !block_ids.empty()) {
    throw std::invalid_argument("a cached prefix can only start an empty block table");
  }
  if (blocks_taken(block_ids, num_tokens, cached_prefix) > free_queue_.size()) return false;
  const int32_t have = static_cast<int32_t>(block_ids.size() + cached_prefix.size());
  const int32_t need_new = std::max(0, blocks_for(num_tokens) - have);

  for (int32_t id : cached_prefix) {
    Block& b = blocks_[id];
    if (b.ref_count == 0) free_queue_.remove(id);
    ++b.ref_count;
    block_ids.push_back(id);
  }
  for (int32_t i = 0; i < need_new; ++i) {
    const int32_t id = free_queue_.pop_front();
    evict(id);
    blocks_[id].ref_count = 1;
    block_ids.push_back(id);
  }
  return true;
}

int32_t BlockManager::blocks_taken(const std::vector<int32_t>& block_ids, int32_t num_tokens,
                                   const std::vector<int32_t>& cached_prefix) const {
  for (int32_t id : cached_prefix) check_block_id(id);
  const int32_t have = static_cast<int32_t>(block_ids.size() + cached_prefix.size());
  const int32_t need_new = std::max(0, blocks_for(num_tokens) - have);
  // Prefix blocks nobody references sit in the free queue: taking them uses up free blocks too.
  int32_t prefix_in_free_queue = 0;
  for (int32_t id : cached_prefix) prefix_in_free_queue += blocks_[id].ref_count == 0;
  return need_new + prefix_in_free_queue;
}

bool BlockManager::allocate_for_write(std::vector<int32_t>& block_ids, int32_t write_from,
                                      int32_t num_tokens, std::vector<int32_t>& copies) {
  const size_t index = static_cast<size_t>(write_from / tokens_per_block_);
  if (write_from >= 0 && index < block_ids.size() && block_ids[index] == kReleased) {
    throw std::logic_error("position " + std::to_string(write_from) +
                           " is written, but its block was released (before the sliding window)");
  }
  const bool copy = write_from >= 0 && index < block_ids.size() &&
                    blocks_[block_ids[index]].ref_count > 1;
  if (!copy) return allocate(block_ids, num_tokens);
  const int32_t need_new = std::max(0, blocks_for(num_tokens) - static_cast<int32_t>(block_ids.size()));
  if (need_new + 1 > free_queue_.size()) return false;
  const int32_t fresh = free_queue_.pop_front();
  evict(fresh);
  blocks_[fresh].ref_count = 1;
  --blocks_[block_ids[index]].ref_count;  // was > 1: still referenced, stays out of the free queue
  copies.push_back(block_ids[index]);
  copies.push_back(fresh);
  block_ids[index] = fresh;
  const bool grown = allocate(block_ids, num_tokens);
  (void)grown;  // checked above: need_new blocks are free
  return true;
}

std::vector<int32_t> BlockManager::fork(const std::vector<int32_t>& block_ids) {
  for (int32_t id : block_ids) {
    if (id == kReleased) continue;
    check_block_id(id);
    if (blocks_[id].ref_count <= 0) {
      throw std::invalid_argument("block " + std::to_string(id) + " is forked but not in use");
    }
  }
  for (int32_t id : block_ids) {
    if (id != kReleased) ++blocks_[id].ref_count;
  }
  return block_ids;
}

void BlockManager::evict(int32_t block_id) {
  Block& b = blocks_[block_id];
  if (!b.hashed) return;
  auto it = cached_.find(b.hash);
  if (it != cached_.end() && it->second == block_id) cached_.erase(it);
  b.hashed = false;
  b.tokens.clear();
}

void BlockManager::free(std::vector<int32_t>& block_ids) {
  for (int32_t id : block_ids) {
    if (id != kReleased) check_block_id(id);
  }
  for (auto it = block_ids.rbegin(); it != block_ids.rend(); ++it) {
    if (*it == kReleased) continue;
    Block& b = blocks_[*it];
    if (b.ref_count <= 0) {
      throw std::invalid_argument("block " + std::to_string(*it) + " is freed but not in use");
    }
    if (--b.ref_count == 0) free_queue_.push_back(*it);
  }
  block_ids.clear();
}

void BlockManager::truncate(std::vector<int32_t>& block_ids, int32_t num_tokens) {
  const size_t keep = std::min(block_ids.size(), static_cast<size_t>(blocks_for(std::max(num_tokens, 0))));
  if (keep == block_ids.size()) return;
  std::vector<int32_t> tail(block_ids.begin() + static_cast<std::ptrdiff_t>(keep), block_ids.end());
  free(tail);  // validates every id before it releases any
  block_ids.resize(keep);
}

int32_t BlockManager::release_leading(std::vector<int32_t>& block_ids, int32_t count) {
  const size_t end = std::min(static_cast<size_t>(std::max(count, 0)), block_ids.size());
  for (size_t i = 0; i < end; ++i) {
    const int32_t id = block_ids[i];
    if (id == kReleased) continue;
    check_block_id(id);
    if (blocks_[id].ref_count <= 0) {
      throw std::invalid_argument("block " + std::to_string(id) + " is released but not in use");
    }
  }
  int32_t released = 0;
  for (size_t i = 0; i < end; ++i) {
    const int32_t id = block_ids[i];
    if (id == kReleased) continue;
    if (--blocks_[id].ref_count == 0) free_queue_.push_back(id);
    block_ids[i] = kReleased;
    ++released;
  }
  return released;
}

void BlockManager::cache_full_blocks(const std::vector<int32_t>& block_ids,
                                     const std::vector<int32_t>& tokens,
                                     int32_t num_computed_tokens, uint64_t root) {
  if (!prefix_caching_) return;
  const int32_t B = tokens_per_block_;
  const int32_t computed = std::min(num_computed_tokens, static_cast<int32_t>(tokens.size()));
  const int32_t num_full = std::min(computed / B, static_cast<int32_t>(block_ids.size()));
  uint64_t parent = root;
  bool parent_known = true;  // false after released entries: their blocks' hashes are not at hand
  // Hashed blocks form a prefix of the table (released entries at its head), so this walks the
  // already-hashed ones for their chain and hashes the rest: O(table length), a few hundred steps.
  for (int32_t i = 0; i < num_full; ++i) {
    if (block_ids[i] == kReleased) {
      parent_known = false;
      continue;
    }
    check_block_id(block_ids[i]);
    Block& b = blocks_[block_ids[i]];
    if (b.hashed) {
      parent = b.hash;
      parent_known = true;
      continue;
    }
    if (!parent_known) {
      // Its parent was released before it filled (a window within one block): chain from the root.
      parent = root;
      for (int32_t j = 0; j < i; ++j) {
        parent = hash_block_tokens(parent, tokens.data() + static_cast<size_t>(j) * B, B);
      }
      parent_known = true;
    }
    const int32_t* seg = tokens.data() + static_cast<size_t>(i) * B;
    b.hashed = true;
    b.parent_hash = parent;
    b.hash = hash_block_tokens(parent, seg, B);
    b.tokens.assign(seg, seg + B);
    cached_.emplace(b.hash, block_ids[i]);  // keeps the first block registered for this prefix
    parent = b.hash;
  }
}

}  // namespace llmapi
