"""``seed.ova``: an OVF 1.0 appliance (descriptor, stream-optimized vmdk, SHA-256 manifest).

VirtualBox (File > Import Appliance) and VMware (Open / ovftool) create a VM from it with
sensible defaults: 1 CPU, 1 GiB RAM, the seed disk on an IDE controller (every guest boots
from it with no driver question), an E1000 NIC on NAT (both hypervisors emulate it), and a
64-bit Linux guest type. The OVA is a POSIX ustar archive with the descriptor first, as the
OVF specification requires.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from xml.sax.saxutils import escape

from seedboot.tools import command, diskimage

OVF_NAME = "seed.ovf"
DISK_NAME = "seed-disk1.vmdk"
MEMORY_MB = 1024


def descriptor(disk_file_size: int, capacity: int, populated: int, name: str = "seedboot") -> str:
    n = escape(name)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope ovf:version="1.0" xml:lang="en-US"
    xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:id="file1" ovf:href="{DISK_NAME}" ovf:size="{disk_file_size}"/>
  </References>
  <DiskSection>
    <Info>The seed disk: GRUB, kernel, miniroot and the KNXBLOCK block cache</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1"
        ovf:fileRef="file1" ovf:populatedSize="{populated}"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>The network the OS image is streamed over</Info>
    <Network ovf:name="NAT">
      <Description>NAT: the guest reaches the HTTP mirrors through the host</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{n}">
    <Info>{n}: boots an OS streamed block by block from signed HTTP mirrors</Info>
    <Name>{n}</Name>
    <OperatingSystemSection ovf:id="101">
      <Info>The guest operating system</Info>
      <Description>Linux 64-bit</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{n}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2 vmx-10</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>1 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>1 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Caption>{MEMORY_MB} MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>{MEMORY_MB} MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{MEMORY_MB}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>ideController0</rasd:Caption>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>ideController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:Caption>disk1</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>Ethernet adapter on 'NAT'</rasd:Caption>
        <rasd:Connection>NAT</rasd:Connection>
        <rasd:ElementName>Ethernet adapter on 'NAT'</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_ova(raw: Path, out: Path, capacity: int, workdir: Path) -> Path:
    """Convert RAW to a stream-optimized vmdk and pack it with its descriptor and manifest."""
    disk = workdir / DISK_NAME
    command.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                 str(raw), str(disk)])  # fmt: skip
    ovf = workdir / OVF_NAME
    ovf.write_text(descriptor(disk.stat().st_size, capacity, diskimage.allocated(raw)))
    mf = workdir / "seed.mf"
    mf.write_text(f"SHA256({OVF_NAME})= {_sha256(ovf)}\nSHA256({DISK_NAME})= {_sha256(disk)}\n")
    tmp = out.with_suffix(".ova.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for p in (ovf, disk, mf):
            info = tar.gettarinfo(str(p), arcname=p.name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with open(p, "rb") as f:
                tar.addfile(info, f)
    tmp.replace(out)
    return out
