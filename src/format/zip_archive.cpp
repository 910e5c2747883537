// The zip directory reader (layout in zip_archive.hpp).
#include "format/zip_archive.hpp"

#include <algorithm>
#include <optional>
#include <vector>

#include <fmt/format.h>

#include "format/internal.hpp"
#include "taskvec/error.hpp"

namespace taskvec::format_detail {

const ZipEntry* ZipDirectory::find(std::string_view name) const noexcept {
  const auto it = by_name.find(name);
  return it == by_name.end() ? nullptr : &entries[it->second];
}

namespace {

constexpr std::uint32_t kLocalSig = 0x04034b50;
constexpr std::uint32_t kCentralSig = 0x02014b50;
constexpr std::uint32_t kEocdSig = 0x06054b50;
constexpr std::uint32_t kZip64LocatorSig = 0x07064b50;
constexpr std::uint32_t kZip64EocdSig = 0x06064b50;
constexpr std::uint64_t kEocdSize = 22;
constexpr std::uint64_t kZip64LocatorSize = 20;
constexpr std::uint64_t kZip64EocdSize = 56;
constexpr std::uint64_t kLocalSize = 30;
constexpr std::uint64_t kCentralSize = 46;
constexpr std::uint32_t kMax32 = 0xFFFFFFFF;
constexpr std::uint16_t kMax16 = 0xFFFF;

[[noreturn]] void fail(const std::string& label, const std::string& what) {
  throw Error(ErrorCode::kInvalidArchive, label + ": " + what);
}

[[noreturn]] void fail_entry(const std::string& label, std::string_view name, const std::string& what) {
  throw Error(ErrorCode::kInvalidArchive, label + ": zip entry " + quote_name(name) + ": " + what);
}

std::uint16_t u16(const std::byte* p) {
  return static_cast<std::uint16_t>(std::to_integer<unsigned>(p[0]) | (std::to_integer<unsigned>(p[1]) << 8));
}
std::uint32_t u32(const std::byte* p) {
  return static_cast<std::uint32_t>(u16(p)) | (static_cast<std::uint32_t>(u16(p + 2)) << 16);
}
std::uint64_t u64(const std::byte* p) { return static_cast<std::uint64_t>(u32(p)) | (static_cast<std::uint64_t>(u32(p + 4)) << 32); }

std::vector<std::byte> read_bytes(const ZipReadAt& read_at, std::uint64_t offset, std::uint64_t size) {
  std::vector<std::byte> out(static_cast<std::size_t>(size));
  if (size > 0) read_at(offset, out);
  return out;
}

// The fields of a zip64 extra field (id 0x0001) that the 32-bit fields mark as present.
struct Zip64Fields {
  std::optional<std::uint64_t> uncompressed, compressed, offset;
};

Zip64Fields parse_zip64_extra(std::span<const std::byte> extra, bool want_usize, bool want_csize, bool want_offset,
                              const std::string& label, std::string_view name, bool required) {
  Zip64Fields out;
  std::size_t pos = 0;
  while (pos + 4 <= extra.size()) {
    const std::uint16_t id = u16(extra.data() + pos);
    const std::uint16_t len = u16(extra.data() + pos + 2);
    if (pos + 4 + len > extra.size()) fail_entry(label, name, "extra field runs past its header");
    if (id == 0x0001) {
      std::size_t q = pos + 4;
      const std::size_t end = q + len;
      auto take = [&](std::optional<std::uint64_t>& field) {
        if (q + 8 > end) fail_entry(label, name, "zip64 extra field is too short for the sizes it must hold");
        field = u64(extra.data() + q);
        q += 8;
      };
      if (want_usize) take(out.uncompressed);
      if (want_csize) take(out.compressed);
      if (want_offset) take(out.offset);
      return out;
    }
    pos += 4 + std::size_t{len};
  }
  if (required && (want_usize || want_csize || want_offset)) {
    fail_entry(label, name, "a size or offset is 0xFFFFFFFF but there is no zip64 extra field");
  }
  return out;
}

void check_name(const std::string& label, const std::string& name) {
  if (name.empty()) fail(label, "a zip entry has an empty name");
  if (!is_valid_utf8(name)) fail_entry(label, name, "name is not valid UTF-8");
  for (const char c : name) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7F) fail_entry(label, name, "name has a control character");
    if (c == '\\') fail_entry(label, name, "name has a backslash (entries must not escape the archive)");
  }
  if (name.front() == '/') fail_entry(label, name, "name is an absolute path");
  std::size_t start = 0;
  while (start <= name.size()) {
    std::size_t end = name.find('/', start);
    if (end == std::string::npos) end = name.size();
    if (name.compare(start, end - start, "..") == 0) fail_entry(label, name, "name has a '..' component");
    start = end + 1;
  }
}

}  // namespace

ZipDirectory read_zip_directory(std::uint64_t file_size, const ZipReadAt& read_at, const std::string& label) {
  if (file_size < kEocdSize) fail(label, fmt::format("{} bytes is too short for a zip archive (truncated?)", file_size));

  // --- End Of Central Directory: the last 22 + comment bytes; the comment must reach the end exactly.
  const std::uint64_t tail_size = std::min<std::uint64_t>(file_size, kEocdSize + kMax16);
  const std::uint64_t tail_start = file_size - tail_size;
  const std::vector<std::byte> tail = read_bytes(read_at, tail_start, tail_size);
  std::optional<std::uint64_t> eocd_pos;  // in tail
  for (std::uint64_t p = tail_size - kEocdSize + 1; p-- > 0;) {
    if (u32(tail.data() + p) == kEocdSig && p + kEocdSize + u16(tail.data() + p + 20) == tail_size) {
      eocd_pos = p;
      break;
    }
  }
  if (!eocd_pos) fail(label, "no zip End Of Central Directory record at the end of the file (truncated, or not a zip archive)");
  const std::byte* eocd = tail.data() + *eocd_pos;
  const std::uint64_t eocd_offset = tail_start + *eocd_pos;
  const std::uint16_t disk = u16(eocd + 4), cd_disk = u16(eocd + 6);
  std::uint64_t entries_on_disk = u16(eocd + 8), entry_count = u16(eocd + 10);
  std::uint64_t cd_size = u32(eocd + 12), cd_offset = u32(eocd + 16);
  std::uint64_t cd_limit = eocd_offset;  // the central directory ends at or before this offset

  ZipDirectory dir;
  // --- zip64: a locator just before the EOCD points at the zip64 record.
  if (eocd_offset >= kZip64LocatorSize) {
    const std::vector<std::byte> loc = read_bytes(read_at, eocd_offset - kZip64LocatorSize, kZip64LocatorSize);
    if (u32(loc.data()) == kZip64LocatorSig) {
      if (u32(loc.data() + 4) != 0 || u32(loc.data() + 16) > 1) fail(label, "zip64 locator names another disk (multi-disk archives are not supported)");
      const std::uint64_t rec_offset = u64(loc.data() + 8);
      const std::uint64_t loc_offset = eocd_offset - kZip64LocatorSize;
      if (rec_offset > loc_offset || loc_offset - rec_offset < kZip64EocdSize) {
        fail(label, fmt::format("zip64 EOCD locator points at byte {}, not before the locator at byte {}", rec_offset, loc_offset));
      }
      const std::vector<std::byte> rec = read_bytes(read_at, rec_offset, kZip64EocdSize);
      if (u32(rec.data()) != kZip64EocdSig) fail(label, fmt::format("no zip64 EOCD record at byte {} where the locator points", rec_offset));
      if (u32(rec.data() + 16) != 0 || u32(rec.data() + 20) != 0) fail(label, "zip64 EOCD record names another disk (multi-disk archives are not supported)");
      const std::uint64_t z_on_disk = u64(rec.data() + 24), z_count = u64(rec.data() + 32);
      const std::uint64_t z_cd_size = u64(rec.data() + 40), z_cd_offset = u64(rec.data() + 48);
      auto agree = [&](std::uint64_t v32, std::uint64_t sentinel, std::uint64_t v64, const char* what) {
        if (v32 != sentinel && v32 != v64) {
          fail(label, fmt::format("EOCD says {} {} but the zip64 EOCD record says {}", what, v32, v64));
        }
      };
      agree(entries_on_disk, kMax16, z_on_disk, "entries on disk");
      agree(entry_count, kMax16, z_count, "entry count");
      agree(cd_size, kMax32, z_cd_size, "central directory size");
      agree(cd_offset, kMax32, z_cd_offset, "central directory offset");
      entries_on_disk = z_on_disk;
      entry_count = z_count;
      cd_size = z_cd_size;
      cd_offset = z_cd_offset;
      cd_limit = rec_offset;
      dir.zip64 = true;
    }
  }
  if (disk != 0 || cd_disk != 0 || entries_on_disk != entry_count) fail(label, "archive spans several disks (not supported)");
  if (entry_count > kMaxZipEntries) fail(label, fmt::format("{} entries, more than the limit of {}", entry_count, kMaxZipEntries));
  if (cd_offset > cd_limit || cd_size > cd_limit - cd_offset) {
    fail(label, fmt::format("central directory [{}, +{}) does not end before byte {} (truncated or corrupt)", cd_offset, cd_size, cd_limit));
  }
  if (cd_size > kMaxZipCentralDirectory) fail(label, fmt::format("central directory of {} bytes, more than the limit of {}", cd_size, kMaxZipCentralDirectory));
  if (cd_size < entry_count * kCentralSize) {
    fail(label, fmt::format("central directory of {} bytes cannot hold {} entries", cd_size, entry_count));
  }
  dir.central_directory_offset = cd_offset;

  // --- Central directory.
  const std::vector<std::byte> cd = read_bytes(read_at, cd_offset, cd_size);
  std::uint64_t pos = 0;
  dir.entries.reserve(static_cast<std::size_t>(entry_count));
  for (std::uint64_t i = 0; i < entry_count; ++i) {
    if (cd_size - pos < kCentralSize) fail(label, fmt::format("central directory entry {} is cut short", i));
    const std::byte* h = cd.data() + pos;
    if (u32(h) != kCentralSig) fail(label, fmt::format("central directory entry {} at byte {} has a bad signature", i, cd_offset + pos));
    const std::uint16_t flags = u16(h + 8), method = u16(h + 10);
    const std::uint32_t crc = u32(h + 16);
    std::uint64_t csize = u32(h + 20), usize = u32(h + 24);
    const std::uint64_t name_len = u16(h + 28), extra_len = u16(h + 30), comment_len = u16(h + 32);
    const std::uint16_t start_disk = u16(h + 34);
    std::uint64_t local = u32(h + 42);
    if (cd_size - pos - kCentralSize < name_len + extra_len + comment_len) {
      fail(label, fmt::format("central directory entry {} runs past the central directory", i));
    }
    std::string name(reinterpret_cast<const char*>(h + kCentralSize), static_cast<std::size_t>(name_len));
    check_name(label, name);
    const std::span<const std::byte> extra(h + kCentralSize + name_len, static_cast<std::size_t>(extra_len));
    const Zip64Fields z = parse_zip64_extra(extra, usize == kMax32, csize == kMax32, local == kMax32, label, name, true);
    if (z.uncompressed) usize = *z.uncompressed;
    if (z.compressed) csize = *z.compressed;
    if (z.offset) local = *z.offset;
    if (start_disk != 0 && start_disk != kMax16) fail_entry(label, name, "lies on another disk");
    if ((flags & 0x0001) != 0) fail_entry(label, name, "is encrypted (not supported)");
    if (method != 0) {
      const bool bomb = csize == 0 ? usize > 0 : usize / csize >= 100;
      fail_entry(label, name, fmt::format("is compressed (method {}{}){}; taskvec reads only stored entries, as torch.save "
                                          "writes them (re-save the checkpoint with torch.save)",
                                          method, method == 8 ? ", deflate" : "",
                                          bomb ? fmt::format(", declaring {} bytes from {} (a zip-bomb ratio)", usize, csize) : ""));
    }
    if (usize > csize) {
      fail_entry(label, name, fmt::format("is stored but declares {} uncompressed bytes for {} stored bytes (a zip-bomb ratio)", usize, csize));
    }
    if (csize != usize) fail_entry(label, name, fmt::format("is stored but its sizes differ ({} and {} bytes)", csize, usize));
    if (dir.by_name.count(name) != 0) fail_entry(label, name, "occurs twice in the central directory");
    dir.by_name.emplace(name, dir.entries.size());
    dir.entries.push_back(ZipEntry{std::move(name), local, 0, csize, crc});
    pos += kCentralSize + name_len + extra_len + comment_len;
  }
  if (pos != cd_size) fail(label, fmt::format("central directory has {} bytes after its {} entries", cd_size - pos, entry_count));

  // --- Local headers: agree with the central directory; data inside the file, before the directory.
  for (ZipEntry& e : dir.entries) {
    if (e.local_header_offset > cd_offset || cd_offset - e.local_header_offset < kLocalSize) {
      fail_entry(label, e.name, fmt::format("local header at byte {} is not before the central directory", e.local_header_offset));
    }
    const std::vector<std::byte> lh = read_bytes(read_at, e.local_header_offset, kLocalSize);
    if (u32(lh.data()) != kLocalSig) fail_entry(label, e.name, fmt::format("no local header signature at byte {}", e.local_header_offset));
    const std::uint16_t flags = u16(lh.data() + 6), method = u16(lh.data() + 8);
    const std::uint64_t csize = u32(lh.data() + 18), usize = u32(lh.data() + 22);
    const std::uint64_t name_len = u16(lh.data() + 26), extra_len = u16(lh.data() + 28);
    const std::uint64_t var_offset = e.local_header_offset + kLocalSize;
    if (cd_offset - var_offset < name_len + extra_len) fail_entry(label, e.name, "local header runs into the central directory");
    const std::vector<std::byte> var = read_bytes(read_at, var_offset, name_len + extra_len);
    const std::string_view local_name(reinterpret_cast<const char*>(var.data()), static_cast<std::size_t>(name_len));
    if (local_name != e.name) {
      fail_entry(label, e.name, "local header names it " + quote_name(local_name) + " (local and central headers disagree)");
    }
    if (method != 0) fail_entry(label, e.name, fmt::format("local header says method {}, the central directory 0", method));
    if ((flags & 0x0008) == 0) {  // sizes are in the local header (else in a data descriptor after the data)
      const std::span<const std::byte> extra(var.data() + name_len, static_cast<std::size_t>(extra_len));
      const Zip64Fields z = parse_zip64_extra(extra, usize == kMax32, csize == kMax32, false, label, e.name, false);
      const std::uint64_t lc = z.compressed.value_or(csize), lu = z.uncompressed.value_or(usize);
      if (lc != e.size || lu != e.size) {
        fail_entry(label, e.name, fmt::format("local header sizes ({}, {}) disagree with the central directory ({})", lc, lu, e.size));
      }
    }
    e.data_offset = var_offset + name_len + extra_len;
    if (e.size > cd_offset - e.data_offset) {
      fail_entry(label, e.name, fmt::format("data [{}, +{}) runs past the central directory at byte {} (truncated?)",
                                            e.data_offset, e.size, cd_offset));
    }
  }

  // --- No two entries overlap: [local header, data end) in file order.
  std::vector<std::size_t> order(dir.entries.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return dir.entries[a].local_header_offset < dir.entries[b].local_header_offset;
  });
  for (std::size_t k = 1; k < order.size(); ++k) {
    const ZipEntry& prev = dir.entries[order[k - 1]];
    const ZipEntry& cur = dir.entries[order[k]];
    if (cur.local_header_offset < prev.data_offset + prev.size) {
      fail_entry(label, cur.name, "overlaps entry " + quote_name(prev.name));
    }
  }
  return dir;
}

}  // namespace taskvec::format_detail
